/* tests/test_backend.c — the kernel interface (struct moe_backend, moe.h section 3) walked
   entry by entry against plain references written here from each entry's contract comment,
   in the manner of ggml's test-backend-ops.

   How it runs. One table, `entries`, has a row per function pointer of moe_backend: its name,
   its offset in the struct, its test and its exactness class. The first case checks that the
   table covers the struct exactly (an entry added to the struct without a row fails the
   suite) and that the backend fills every entry; then each row runs as one case, one line
   of output. The backend under test is the pointer `be`: moe__cpu_backend(), or in a build of
   this file by nvcc with MOE_CUDA (see main) the CUDA table after moe_ctx_set_device, which
   runs the same rows against the same references.
   Tests never assume host pointers: inputs are built on the host, uploaded with be->alloc +
   be->copy(MOE__H2D), the entry runs on device pointers (host_* arguments and the op structs
   stay on the host, as the contract says), outputs come back with be->copy(MOE__D2H) and are
   compared with the reference on the host. Every entry runs with 1 and with 2 threads
   (moe_ctx_set_threads) and, since the contract promises results independent of the thread
   count ("every sum runs in a fixed order"), the two results must be bit-identical; at
   least one shape of each loop-parallel kernel is above the base's split threshold
   (MOE__PAR_WORK, pinned below to 16384 work units, and MOE__GEMM_MT_FLOPS) so the parallel
   path runs.

   Exactness classes (each row carries one; the worst measured error is printed per entry):
   - BITEXACT: memory, copies, gathers and scatters, order-defined sums in moe_real
     (scatter_add, combine, sum), the dispatch plan, top-k, conversions (against our own
     round-to-nearest-even BF16 and saturating E4M3, written independently of moe.h),
     quantisation, fill, routing choices. Printed: the number of differing elements (0).
     Products followed by a sum (combine, axpy, mul and copy2d with accumulate) are
     references with a rounded product, then a rounded sum: no fused multiply-add.
   - ULP: element- and row-wise math through exp/log/sqrt/div. The error of a value is
     |got − ref| / (2^-23·max(|ref|, mag)), "ulps" of the reference (ref in double), where
     mag is the magnitude of the terms that make the value when it can cancel (stated per
     entry). Printed: the worst ulps.
   - NORMREL: order-dependent reductions (GEMM, attention, norms' backward, sums over rows):
     ‖got − ref‖₂ / ‖ref‖₂ ≤ tol, each tol stated with its justification: an FP32 sum of K
     terms is within K·2^-24·Σ|terms| of the exact value (each addition rounds once), so we
     allow 4·(K + few)·2^-24 times the ratio ‖Σ|terms|‖/‖ref‖ where it matters.
   A row's class is that of its main output; an entry's other outputs are checked in their
   own class (e.g. router_fwd: exact choices, scores within ulps) and printed too.
   Sizes shrink under MOE_TEST_QUICK=1 (sanitizer builds); MOE_TEST_VERBOSE=1 prints every
   check's error and tolerance; an argument runs only the entries whose name contains it.
   The float build only: under MOE_REAL_F64 the suite checks the table's coverage and skips
   the numerics.

   The device: `--device cpu` (default) or `--device cuda[:N]` (GPU N, default 0) beside the
   filter argument, or the environment's MOE_TEST_DEVICE=cpu|cuda[:N]. The CUDA table exists
   only when this file is compiled by nvcc with MOE_CUDA defined, e.g.
     nvcc -std=c++17 -x cu -gencode arch=compute_90a,code=sm_90a -DMOE_CUDA --fmad=false -O3 \
          -Xcompiler -ffp-contract=off -I. tests/test_backend.c -o build/test_backend_cuda -lcublasLt
   (plus the strict flags of cuda_parts/check.sh; it compiles under them).
   An explicit `--device cuda` that cannot be had (no GPU, no driver, a gcc build) is an error
   (exit 2); MOE_TEST_DEVICE=cuda is "the GPU if there is one": without one the suite prints a
   `skip:` line and `SUITE: 0 passed, 0 failed` and exits 0. On the GPU the 1- and 2-thread
   runs stay: the thread count means nothing there, so they are two runs of the same kernels,
   which must give the same bits (no float atomics, every sum in a fixed order). */
/* The split thresholds these shapes were sized against (moe.h's defaults are higher, tuned
   to the cost of waking a thread): the parallel paths must run here. */
#define MOE__PAR_WORK 16384.0
#define MOE__GEMM_MT_FLOPS 3.0e6
#define MOE_IMPLEMENTATION
#include "moe.h"
#include "test.h"

#include <float.h>
#include <math.h>
#include <stddef.h>
#include <stdlib.h>

enum { BITEXACT = 0, ULP = 1, NORMREL = 2 };
static const char *const class_name[3] = {"BITEXACT", "ULP", "NORMREL"};

static moe_ctx *ctx;
static const moe_backend *be;
static int quick;
static moe_rng rng;
static char shape[256]; /* the shape being tested, for failure messages */
#define SHAPE(...) snprintf(shape, sizeof shape, __VA_ARGS__)

static const double U24 = 5.9604644775390625e-08; /* 2^-24, the unit roundoff of float */

/* ---- memory: host buffers and device buffers, all released at the end of each case ---- */

#define MAX_ALLOCS 1024
static void *host_ptrs[MAX_ALLOCS], *dev_ptrs[MAX_ALLOCS];
static int n_host, n_dev;

static void die(const char *what) {
    fprintf(stderr, "test_backend: %s (%s)\n", what, moe_ctx_error(ctx));
    exit(2);
}
static void *hbuf(size_t bytes) {
    void *p = calloc(1, bytes ? bytes : 1);
    if (!p || n_host == MAX_ALLOCS) die("out of host memory or allocation slots");
    host_ptrs[n_host++] = p;
    return p;
}
#define HR(n) ((moe_real *)hbuf((size_t)(n) * sizeof(moe_real)))
#define HD(n) ((double *)hbuf((size_t)(n) * sizeof(double)))
#define HI(n) ((int32_t *)hbuf((size_t)(n) * sizeof(int32_t)))
#define HF(n) ((float *)hbuf((size_t)(n) * sizeof(float)))
#define HB(n) ((uint8_t *)hbuf((size_t)(n)))

static void *dalloc(size_t bytes) {
    void *p = NULL;
    if (be->alloc(ctx, bytes, &p) != MOE_OK || !p || n_dev == MAX_ALLOCS) die("device alloc failed");
    dev_ptrs[n_dev++] = p;
    return p;
}
static void dfree(void *p) {
    int i;
    for (i = 0; i < n_dev; i++)
        if (dev_ptrs[i] == p) {
            dev_ptrs[i] = dev_ptrs[--n_dev];
            break;
        }
    be->free(ctx, p);
}
/* a device copy of host data */
static void *up(const void *h, size_t bytes) {
    void *d = dalloc(bytes);
    if (bytes && be->copy(ctx, d, h, bytes, MOE__H2D) != MOE_OK) die("H2D copy failed");
    return d;
}
static void down(void *h, const void *d, size_t bytes) {
    if (bytes && be->copy(ctx, h, d, bytes, MOE__D2H) != MOE_OK) die("D2H copy failed");
}
#define UPR(h, n) ((moe_real *)up((h), (size_t)(n) * sizeof(moe_real)))
#define UPI(h, n) ((int32_t *)up((h), (size_t)(n) * sizeof(int32_t)))
#define DOWNR(h, d, n) down((h), (d), (size_t)(n) * sizeof(moe_real))
static void release_all(void) {
    while (n_dev > 0) be->free(ctx, dev_ptrs[--n_dev]);
    while (n_host > 0) free(host_ptrs[--n_host]);
    moe_ctx_reset(ctx);
}

/* ---- inputs ---- */

static double urand(void) { return (double)moe_rng_uniform(&rng); }
static void rnd(moe_real *x, int64_t n, double lo, double hi) {
    int64_t i;
    for (i = 0; i < n; i++) x[i] = (moe_real)(lo + (hi - lo) * urand());
}
static moe_real *rndr(int64_t n, double lo, double hi) {
    moe_real *x = HR(n);
    rnd(x, n, lo, hi);
    return x;
}
static moe_real *nanr(int64_t n) { /* an output buffer's garbage: NaN everywhere */
    moe_real *x = HR(n);
    int64_t i;
    for (i = 0; i < n; i++) x[i] = (moe_real)NAN;
    return x;
}
static moe_real *copyr(const moe_real *x, int64_t n) {
    moe_real *y = HR(n);
    memcpy(y, x, (size_t)n * sizeof(moe_real));
    return y;
}
static int64_t irand(int64_t n) { return (int64_t)(urand() * (double)n) % n; }

/* ---- threads ---- */

/* Runs its body with 1 thread, then with 2 (th = 1, 2): outputs go to slot th − 1. */
#define FOR_THREADS(th) for ((th) = 1; (th) <= 2 && moe_ctx_set_threads(ctx, (th)) == MOE_OK; (th)++)

#define CALL(expr)                                                                                                     \
    do {                                                                                                               \
        moe_status st_ = (expr);                                                                                       \
        T_ASSERT(st_ == MOE_OK, "%s: %s (%s)", shape, moe_status_name(st_), moe_ctx_error(ctx));                       \
    } while (0)

/* ---- checks: each records the worst error of its class for the case's note ---- */

static double g_worst[3], g_ratio[3];
static int g_used[3];
static long g_thread_checks;

static int verbose; /* MOE_TEST_VERBOSE=1: a note per check */
static void note_err(const char *what, int cls, double err, double tol) {
    if (verbose) T_NOTE("  %-8s %-24s %-10.3g tol %-10.3g %s", class_name[cls], what, err, tol, shape);
    g_used[cls] = 1;
    if (!(err <= g_worst[cls])) g_worst[cls] = err; /* NaN sticks */
    if (tol > 0 && !(err / tol <= g_ratio[cls])) g_ratio[cls] = err / tol;
}

/* 1 and 2 threads must give the same bits */
static void same_bits(const char *what, const void *a, const void *b, size_t bytes) {
    g_thread_checks++;
    T_CHECK(memcmp(a, b, bytes) == 0, "%s %s: 1 and 2 threads give different bits", what, shape);
}

static int real_same(moe_real a, moe_real b) { return memcmp(&a, &b, sizeof a) == 0 || (a != a && b != b); }

/* BITEXACT on moe_real values (any NaN equals any NaN) */
static void chk_exact_real(const char *what, const moe_real *got, const moe_real *ref, int64_t n) {
    int64_t i, bad = 0, first = -1;
    for (i = 0; i < n; i++)
        if (!real_same(got[i], ref[i])) {
            if (first < 0) first = i;
            bad++;
        }
    note_err(what, BITEXACT, (double)bad, 0);
    T_CHECK(bad == 0, "%s %s: %lld of %lld values differ, first at %lld: got %.9g want %.9g", what, shape, (long long)bad,
            (long long)n, (long long)first, first >= 0 ? (double)got[first] : 0.0, first >= 0 ? (double)ref[first] : 0.0);
}
/* BITEXACT on raw elements of `size` bytes (indices, codes, scales) */
static void chk_exact_raw(const char *what, const void *got, const void *ref, int64_t n, size_t size) {
    int64_t i, bad = 0, first = -1;
    for (i = 0; i < n; i++)
        if (memcmp((const char *)got + (size_t)i * size, (const char *)ref + (size_t)i * size, size) != 0) {
            if (first < 0) first = i;
            bad++;
        }
    note_err(what, BITEXACT, (double)bad, 0);
    T_CHECK(bad == 0, "%s %s: %lld of %lld elements differ, first at %lld", what, shape, (long long)bad, (long long)n,
            (long long)first);
}
static void chk_exact_i32(const char *what, const int32_t *got, const int32_t *ref, int64_t n) {
    int64_t i, bad = 0, first = -1;
    for (i = 0; i < n; i++)
        if (got[i] != ref[i]) {
            if (first < 0) first = i;
            bad++;
        }
    note_err(what, BITEXACT, (double)bad, 0);
    T_CHECK(bad == 0, "%s %s: %lld of %lld differ, first at %lld: got %d want %d", what, shape, (long long)bad, (long long)n,
            (long long)first, first >= 0 ? got[first] : 0, first >= 0 ? ref[first] : 0);
}

/* ULP: |got − ref| / (2^-23·max(|ref|, mag[i])) ≤ tol (mag NULL: |ref| alone) */
static void chk_ulp(const char *what, const moe_real *got, const double *ref, const double *mag, int64_t n, double tol) {
    int64_t i, at = -1;
    double worst = 0;
    for (i = 0; i < n; i++) {
        double scale = fabs(ref[i]), e;
        if (mag && mag[i] > scale) scale = mag[i];
        if (scale < FLT_MIN) scale = FLT_MIN;
        e = ((double)got[i] == ref[i] || (got[i] != got[i] && ref[i] != ref[i])) ? 0 : fabs((double)got[i] - ref[i]) / (2 * U24 * scale);
        if (!(e <= worst)) {
            worst = e;
            at = i;
            if (e != e) break;
        }
    }
    note_err(what, ULP, worst, tol);
    T_CHECK(worst <= tol, "%s %s: %.3g ulps (tolerance %.3g) at %lld: got %.9g want %.9g", what, shape, worst, tol,
            (long long)at, at >= 0 ? (double)got[at] : 0.0, at >= 0 ? ref[at] : 0.0);
}

/* NORMREL: ‖got − ref‖ / ‖ref‖ ≤ tol (‖ref‖ = 0: ‖got‖ ≤ tol) */
static double normrel(const moe_real *got, const double *ref, int64_t n) {
    double num = 0, den = 0;
    int64_t i;
    for (i = 0; i < n; i++) {
        double d = (double)got[i] - ref[i];
        num += d * d;
        den += ref[i] * ref[i];
    }
    return den > 0 ? sqrt(num) / sqrt(den) : sqrt(num);
}
static void chk_norm(const char *what, const moe_real *got, const double *ref, int64_t n, double tol) {
    double e = normrel(got, ref, n);
    note_err(what, NORMREL, e, tol);
    T_CHECK(e <= tol, "%s %s: normwise error %.3g > %.3g", what, shape, e, tol);
}
/* ‖mag‖/‖ref‖: how much larger the sum of absolute terms is than the result */
static double cond(const double *mag, const double *ref, int64_t n) {
    double a = 0, b = 0;
    int64_t i;
    for (i = 0; i < n; i++) {
        a += mag[i] * mag[i];
        b += ref[i] * ref[i];
    }
    return b > 0 ? sqrt(a / b) : 1;
}

/* ---- number formats, written here from their definitions ---- */

static float f32_of_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
static uint32_t bits_of_f32(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}
/* BF16 round to nearest, ties to even: the nearer of the two bf16 neighbours of x (the one
   above the largest finite value is 2^128, i.e. infinity). */
static uint16_t ref_bf16(float x) {
    uint32_t u = bits_of_f32(x), lo = u & 0xFFFF0000u, hi = lo + 0x10000u;
    double vlo, vhi, dlo, dhi;
    if (x != x) return 0x7FC0;
    if (isinf(x)) return (uint16_t)(u >> 16);
    vlo = (double)f32_of_bits(lo);
    vhi = (hi & 0x7FFFFFFFu) == 0x7F800000u ? copysign(ldexp(1.0, 128), (double)x) : (double)f32_of_bits(hi);
    dlo = fabs((double)x - vlo);
    dhi = fabs(vhi - (double)x);
    return (uint16_t)((dlo < dhi || (dlo == dhi && !((lo >> 16) & 1u))) ? lo >> 16 : hi >> 16);
}
static double bf16_value(uint16_t h) { return (double)f32_of_bits((uint32_t)h << 16); }
static double round_bf16(double x) { return bf16_value(ref_bf16((float)x)); }
static int bf16_same(uint16_t a, uint16_t b) {
    return a == b || ((a & 0x7F80) == 0x7F80 && (a & 0x7F) && (b & 0x7F80) == 0x7F80 && (b & 0x7F));
}

/* E4M3 (fn): 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities, 0x7F/0xFF NaN,
   largest finite 448 = 0x7E. */
static double e4m3_value(int code) {
    int e = (code >> 3) & 15, m = code & 7;
    double v;
    if ((code & 0x7F) == 0x7F) return NAN;
    v = e ? ldexp(8 + m, e - 10) : ldexp(m, -9);
    return (code & 0x80) ? -v : v;
}
/* Round to the nearest E4M3 value, ties to the even code, saturating to ±448 (infinities too). */
static uint8_t ref_e4m3(double x) {
    uint8_t sign = signbit(x) ? 0x80 : 0;
    double a = fabs(x), db;
    int best = 0, c;
    if (x != x) return 0x7F;
    if (a >= 448) return (uint8_t)(sign | 0x7E);
    db = a;
    for (c = 1; c <= 0x7E; c++) {
        double dc = fabs(e4m3_value(c) - a);
        if (dc < db || (dc == db && !(c & 1))) {
            best = c;
            db = dc;
        } else if (dc > db) {
            break;
        }
    }
    return (uint8_t)(sign | best);
}

/* The FP8 quantiser of the contract: groups gr×gc of x [rows, cols] (row stride ld), scale
   amax/448 (0 or non-finite amax: 1; never below the smallest normal float), with pow2 the
   power of two at or above it; code = e4m3(x/scale) in float, deq = code·scale. */
static float ref_scale(float amax, int pow2) {
    float s = 1.0f;
    if (amax > 0 && !isinf(amax)) {
        s = amax / 448.0f;
        if (s < FLT_MIN) s = FLT_MIN;
    }
    if (pow2) s = (float)ldexp(1.0, (int)ceil(log2((double)s)));
    return s;
}
static void ref_quant(const moe_real *x, int64_t ld, int64_t rows, int64_t cols, int64_t gr, int64_t gc, int pow2,
                      uint8_t *codes, float *scales, moe_real *deq) {
    int64_t ngr = (rows + gr - 1) / gr, ngc = (cols + gc - 1) / gc, a, b, r, c;
    for (a = 0; a < ngr; a++)
        for (b = 0; b < ngc; b++) {
            float amax = 0, s;
            for (r = a * gr; r < rows && r < (a + 1) * gr; r++)
                for (c = b * gc; c < cols && c < (b + 1) * gc; c++)
                    if (fabsf((float)x[r * ld + c]) > amax) amax = fabsf((float)x[r * ld + c]);
            s = ref_scale(amax, pow2);
            if (scales) scales[a * ngc + b] = s;
            for (r = a * gr; r < rows && r < (a + 1) * gr; r++)
                for (c = b * gc; c < cols && c < (b + 1) * gc; c++) {
                    uint8_t q = ref_e4m3((double)((float)x[r * ld + c] / s));
                    if (codes) codes[r * cols + c] = q;
                    if (deq) deq[r * cols + c] = (moe_real)(float)(e4m3_value(q) * (double)s);
                }
        }
}

/* ============================================================================================
   memory
   ============================================================================================ */

static void t_alloc(void) {
    static const size_t sizes[] = {1, 37, 4096 + 3, 1000003};
    size_t s, i;
    for (s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        unsigned char *h = (unsigned char *)hbuf(sizes[s]);
        void *d = NULL;
        size_t nz = 0;
        SHAPE("bytes=%zu", sizes[s]);
        CALL(be->alloc(ctx, sizes[s], &d));
        T_ASSERT(d != NULL, "alloc %s: NULL", shape);
        T_CHECK(((uintptr_t)d % MOE__ALIGN) == 0, "alloc %s: %p is not %d-byte aligned", shape, d, MOE__ALIGN);
        memset(h, 0xA5, sizes[s]);
        down(h, d, sizes[s]);
        for (i = 0; i < sizes[s]; i++) nz += h[i] != 0;
        note_err("zeroed", BITEXACT, (double)nz, 0);
        T_CHECK(nz == 0, "alloc %s: %zu bytes are not zero", shape, nz);
        be->free(ctx, d);
    }
}

static void t_free(void) {
    /* many blocks freed in a mixed order (the leak checker of the sanitizer build sees any
       that stays), then a fresh block is still usable */
    void *p[64];
    int i;
    unsigned char pat[37], back[37];
    SHAPE("64 blocks");
    for (i = 0; i < 64; i++) CALL(be->alloc(ctx, (size_t)(1 + 977 * i), &p[i]));
    for (i = 0; i < 64; i += 2) be->free(ctx, p[i]);
    for (i = 1; i < 64; i += 2) be->free(ctx, p[64 - i]); /* the odd ones, last first */
    memset(pat, 0x3C, sizeof pat);
    p[0] = up(pat, sizeof pat);
    down(back, p[0], sizeof back);
    note_err("data", BITEXACT, memcmp(pat, back, sizeof pat) != 0, 0);
    T_CHECK(memcmp(pat, back, sizeof pat) == 0, "a block after frees does not hold its data");
    dfree(p[0]);
}

static void t_copy(void) {
    static const size_t sizes[] = {1, 37, 65536 + 5};
    size_t s, i;
    for (s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        size_t n = sizes[s];
        unsigned char *h = HB(n), *back = HB(n + 16), *want = HB(n + 16);
        unsigned char *d1, *d2;
        SHAPE("bytes=%zu", n);
        for (i = 0; i < n; i++) h[i] = (unsigned char)(i * 131u + 7u);
        d1 = (unsigned char *)dalloc(n);
        d2 = (unsigned char *)dalloc(n + 16);
        CALL(be->copy(ctx, d1, h, n, MOE__H2D));
        CALL(be->copy(ctx, d2 + 3, d1, n, MOE__D2D)); /* to an unaligned offset, the rest zero */
        CALL(be->copy(ctx, back, d2, n + 16, MOE__D2H));
        memset(want, 0, n + 16);
        memcpy(want + 3, h, n);
        chk_exact_raw("H2D, D2D, D2H", back, want, (int64_t)(n + 16), 1);
        CALL(be->copy(ctx, d2, h, 0, MOE__H2D)); /* zero bytes: nothing */
    }
}

static void t_memset(void) {
    static const size_t sizes[] = {1, 37, 65536 + 5};
    size_t s, i;
    int v;
    for (s = 0; s < sizeof sizes / sizeof sizes[0]; s++)
        for (v = 0; v < 2; v++) {
            size_t n = sizes[s];
            int byte = v ? 0xAB : 0;
            unsigned char *h = HB(n + 8), *want = HB(n + 8), *d;
            SHAPE("bytes=%zu byte=0x%02x", n, byte);
            memset(h, 0x11, n + 8);
            d = (unsigned char *)up(h, n + 8);
            CALL(be->memset(ctx, d + 5, byte, n));
            down(h, d, n + 8);
            for (i = 0; i < n + 8; i++) want[i] = (unsigned char)(i >= 5 && i < n + 5 ? byte : 0x11);
            chk_exact_raw("memset (neighbours untouched)", h, want, (int64_t)(n + 8), 1);
        }
}

static void t_scratch(void) {
    /* aligned, writable, and blocks handed out before a reset do not overlap */
    static const size_t sizes[] = {1, 37, 4096 + 3, 300007};
    unsigned char *d[4], *h, *back;
    size_t s, i, bad = 0;
    for (s = 0; s < 4; s++) {
        SHAPE("bytes=%zu", sizes[s]);
        CALL(be->scratch(ctx, sizes[s], (void **)&d[s]));
        T_ASSERT(d[s] != NULL, "scratch %s: NULL", shape);
        T_CHECK(((uintptr_t)d[s] % MOE__ALIGN) == 0, "scratch %s: %p is not %d-byte aligned", shape, (void *)d[s], MOE__ALIGN);
        h = HB(sizes[s]);
        memset(h, (int)(0x40 + s), sizes[s]);
        CALL(be->copy(ctx, d[s], h, sizes[s], MOE__H2D));
    }
    for (s = 0; s < 4; s++) {
        back = HB(sizes[s]);
        down(back, d[s], sizes[s]);
        for (i = 0; i < sizes[s]; i++) bad += back[i] != (unsigned char)(0x40 + s);
    }
    SHAPE("4 blocks");
    note_err("scratch", BITEXACT, (double)bad, 0);
    T_CHECK(bad == 0, "scratch %s: %zu bytes were overwritten by a later block", shape, bad);
    moe_ctx_reset(ctx);
}

/* ============================================================================================
   GEMM
   ============================================================================================ */

static int64_t g_fp8_block = 32;
static int g_fp8_amax; /* the context's amax_scales */

static void set_fp8(int amax) {
    moe_fp8_options o;
    memset(&o, 0, sizeof o);
    o.block = g_fp8_block;
    o.amax_scales = amax;
    g_fp8_amax = amax;
    if (moe_ctx_set_fp8(ctx, &o) != MOE_OK) die("moe_ctx_set_fp8");
}

/* The values a product multiplies for operand x [rows, cols] (storage order, stride ld):
   x itself (FP32), rounded to bf16 (BF16), or quantised as the recipe's role says (FP8:
   Fprop X and Dgrad dY in 1×B tiles along their rows, weights in B×B blocks, Wgrad dY and
   X in B×1 tiles down their columns), packed [rows, cols]. */
static void ref_operand(const moe_real *x, int64_t ld, int64_t rows, int64_t cols, moe_dtype prec, moe_fp8_role role,
                        double *out) {
    int64_t r, c;
    if (prec == MOE_FP8_E4M3) {
        moe_real *deq = HR(rows * cols);
        int64_t gr = 1, gc = 1, B = g_fp8_block;
        if (role == MOE_FP8_FPROP_W || role == MOE_FP8_DGRAD_W) gr = gc = B;
        else if (role == MOE_FP8_WGRAD_DY || role == MOE_FP8_WGRAD_X) gr = B;
        else gc = B;
        ref_quant(x, ld, rows, cols, gr, gc, !g_fp8_amax, NULL, NULL, deq);
        for (r = 0; r < rows * cols; r++) out[r] = (double)deq[r];
        return;
    }
    for (r = 0; r < rows; r++)
        for (c = 0; c < cols; c++) out[r * cols + c] = prec == MOE_BF16 ? round_bf16((double)x[r * ld + c]) : (double)x[r * ld + c];
}

/* C [m, n] (stride ldc) = alpha·op(A)·op(B) (+ C0), A and B packed as ref_operand gives them;
   mag = |alpha|·Σ|a·b| (+ |C0|), the magnitude the rounding errors scale with. */
static void ref_product(int64_t m, int64_t n, int64_t k, const double *A, int ta, const double *B, int tb, double alpha,
                        const moe_real *C0, int64_t ldc0, double *C, int64_t ldc, double *mag) {
    int64_t i, j, p;
    for (i = 0; i < m; i++)
        for (j = 0; j < n; j++) {
            double s = 0, a = 0;
            for (p = 0; p < k; p++) {
                double x = ta ? A[p * m + i] : A[i * k + p], y = tb ? B[j * k + p] : B[p * n + j];
                s += x * y;
                a += fabs(x * y);
            }
            C[i * ldc + j] = alpha * s + (C0 ? (double)C0[i * ldc0 + j] : 0);
            mag[i * ldc + j] = fabs(alpha) * a + (C0 ? fabs((double)C0[i * ldc0 + j]) : 0);
        }
}

/* Compare C (moe_real, stride ldc, padded) with the reference on the m×n values, and the
   padding with what was there before (an entry writes only its m×n block). */
static void chk_gemm_c(const char *what, const moe_real *got, const moe_real *before, const double *ref, const double *mag,
                       int64_t rows, int64_t n, int64_t ldc, double tol) {
    int64_t i, j, pad_bad = 0, cnt = rows * n;
    moe_real *g = HR(cnt > 0 ? cnt : 1);
    double *r = HD(cnt > 0 ? cnt : 1), *a = HD(cnt > 0 ? cnt : 1);
    for (i = 0; i < rows; i++) {
        for (j = 0; j < n; j++) {
            g[i * n + j] = got[i * ldc + j];
            r[i * n + j] = ref[i * ldc + j];
            a[i * n + j] = mag[i * ldc + j];
        }
        for (j = n; j < ldc; j++) pad_bad += !real_same(got[i * ldc + j], before[i * ldc + j]);
    }
    T_CHECK(pad_bad == 0, "%s %s: %lld values outside the m×n block changed", what, shape, (long long)pad_bad);
    chk_norm(what, g, r, cnt, tol * cond(a, r, cnt));
}

typedef struct gemm_case {
    int64_t m, n, k, batch;
    int ta, tb, acc;
    moe_dtype prec;
    double alpha;
    moe_fp8_role ra, rb;
    int amax;
} gemm_case;

static void run_gemm(const gemm_case *gc) {
    const int64_t m = gc->m, n = gc->n, k = gc->k, nb = gc->batch;
    const int64_t ra = gc->ta ? k : m, ca = gc->ta ? m : k, rb = gc->tb ? n : k, cb = gc->tb ? k : n;
    const int64_t lda = ca + 3, ldb = cb + 5, ldc = n + 2;
    const int64_t sa = ra * lda + 7, sb = rb * ldb + 1, sc = m * ldc + 3;
    moe_real *A = rndr(nb * sa, -1, 1), *B = rndr(nb * sb, -1, 1), *C0 = rndr(nb * sc, -1, 1), *out[2];
    double *Aq = HD(ra * ca > 0 ? ra * ca : 1), *Bq = HD(rb * cb > 0 ? rb * cb : 1), *ref = HD(nb * sc), *mag = HD(nb * sc);
    moe_real *dA = UPR(A, nb * sa), *dB = UPR(B, nb * sb);
    moe__gemm_op op;
    int64_t i;
    int th;
    if (!gc->acc)
        for (i = 0; i < nb * sc; i++) C0[i] = (moe_real)NAN; /* an overwritten C must not be read */
    SHAPE("m=%lld n=%lld k=%lld batch=%lld ta=%d tb=%d acc=%d %s alpha=%g%s", (long long)m, (long long)n, (long long)k,
          (long long)nb, gc->ta, gc->tb, gc->acc, moe_dtype_name(gc->prec), gc->alpha,
          gc->prec == MOE_FP8_E4M3 ? (gc->amax ? " amax scales" : " pow2 scales") : "");
    if (gc->prec == MOE_FP8_E4M3) set_fp8(gc->amax);
    for (i = 0; i < nb; i++) {
        ref_operand(A + i * sa, lda, ra, ca, gc->prec, gc->ra, Aq);
        ref_operand(B + i * sb, ldb, rb, cb, gc->prec, gc->rb, Bq);
        ref_product(m, n, k, Aq, gc->ta, Bq, gc->tb, gc->alpha, gc->acc ? C0 + i * sc : NULL, ldc, ref + i * sc, ldc,
                    mag + i * sc);
    }
    memset(&op, 0, sizeof op);
    op.m = m; op.n = n; op.k = k; op.batch = nb;
    op.a = dA; op.lda = lda; op.stride_a = sa; op.trans_a = gc->ta;
    op.b = dB; op.ldb = ldb; op.stride_b = sb; op.trans_b = gc->tb;
    op.ldc = ldc; op.stride_c = sc;
    op.alpha = (moe_real)gc->alpha;
    op.accumulate = gc->acc;
    op.precision = gc->prec;
    op.role_a = gc->ra; op.role_b = gc->rb;
    FOR_THREADS(th) {
        op.c = UPR(C0, nb * sc);
        CALL(be->gemm(ctx, &op));
        out[th - 1] = HR(nb * sc);
        DOWNR(out[th - 1], op.c, nb * sc);
        moe_ctx_reset(ctx);
    }
    /* FP32 sums of k products (exact for BF16 and FP8 operands): 4·(k + 2)·2^-24 relative to
       |alpha|·Σ|a·b| + |C0| — the + 2 for alpha's product and the accumulate's addition */
    for (i = 0; i < nb; i++)
        chk_gemm_c("C", out[0] + i * sc, C0 + i * sc, ref + i * sc, mag + i * sc, m, n, ldc, 4.0 * (double)(k + 2) * U24);
    same_bits("C", out[0], out[1], (size_t)(nb * sc) * sizeof(moe_real));
#if defined(MOE__GEMM_HAVE_AVX512)
    if (gc->prec == MOE_F32 && be == moe__cpu_backend()) { /* the other FP32 kernel (6×32 zmm or 6×16 ymm): the same bits */
        moe_real *other = HR(nb * sc);
        ctx->conf.f32_zmm = !ctx->conf.f32_zmm;
        op.c = UPR(C0, nb * sc);
        CALL(be->gemm(ctx, &op));
        DOWNR(other, op.c, nb * sc);
        moe_ctx_reset(ctx);
        ctx->conf.f32_zmm = !ctx->conf.f32_zmm;
        T_CHECK(memcmp(out[0], other, (size_t)(nb * sc) * sizeof(moe_real)) == 0, "C %s: the 6x16 and 6x32 FP32 kernels give different bits",
                shape);
    }
#endif
    if (gc->prec == MOE_FP8_E4M3 && k > 0) {
        /* sanity of the recipe against the plain product: each E4M3 operand is within 2^-4
           relative of the value (3 mantissa bits, round to nearest), so the product is within
           about 2·2^-4·|alpha|·Σ|a·b| of the FP32 one */
        double *Af = HD(ra * ca), *Bf = HD(rb * cb), *rf = HD(sc), *mf = HD(sc), num = 0, den = 0;
        int64_t r, c;
        ref_operand(A, lda, ra, ca, MOE_F32, gc->ra, Af);
        ref_operand(B, ldb, rb, cb, MOE_F32, gc->rb, Bf);
        ref_product(m, n, k, Af, gc->ta, Bf, gc->tb, gc->alpha, gc->acc ? C0 : NULL, ldc, rf, ldc, mf);
        for (r = 0; r < m; r++)
            for (c = 0; c < n; c++) {
                double d = (double)out[0][r * ldc + c] - rf[r * ldc + c];
                num += d * d;
                den += mf[r * ldc + c] * mf[r * ldc + c];
            }
        T_CHECK(sqrt(num) <= 2 * 0.0625 * sqrt(den), "FP8 vs FP32 %s: error %.3g of Σ|a·b|", shape, sqrt(num / den));
    }
    if (gc->prec == MOE_FP8_E4M3) set_fp8(0);
}

static void t_gemm(void) {
    const int64_t big = quick ? 67 : 131; /* 2·131·130·97 > MOE__GEMM_MT_FLOPS: the threaded engine */
    const gemm_case cases[] = {
        {1, 1, 1, 1, 0, 0, 0, MOE_F32, 1, MOE_FP8_FPROP_X, MOE_FP8_FPROP_W, 0},
        {3, 5, 7, 1, 0, 0, 1, MOE_F32, 0.5, MOE_FP8_FPROP_X, MOE_FP8_FPROP_W, 0},
        {3, 67, 130, 1, 0, 1, 0, MOE_F32, 1, MOE_FP8_FPROP_X, MOE_FP8_FPROP_W, 0}, /* a few rows: the dot-product path */
        {37, 67, 130, 1, 1, 0, 0, MOE_F32, 1, MOE_FP8_FPROP_X, MOE_FP8_FPROP_W, 0},
        {37, 130, 67, 3, 0, 1, 1, MOE_F32, -1.5, MOE_FP8_FPROP_X, MOE_FP8_FPROP_W, 0},
        {130, 67, 37, 2, 1, 1, 0, MOE_F32, 1, MOE_FP8_FPROP_X, MOE_FP8_FPROP_W, 0},
        {big, 130, 97, 1, 0, 1, 1, MOE_F32, 1, MOE_FP8_FPROP_X, MOE_FP8_FPROP_W, 0},
        {40, 100, 600, 1, 0, 0, 1, MOE_F32, 1, MOE_FP8_FPROP_X, MOE_FP8_FPROP_W, 0}, /* K in blocks; 3 column pairs and a half */
        {3, 5, 0, 1, 0, 0, 0, MOE_F32, 1, MOE_FP8_FPROP_X, MOE_FP8_FPROP_W, 0}, /* k = 0: C = 0 */
        {37, 67, 130, 1, 0, 1, 1, MOE_BF16, 1, MOE_FP8_FPROP_X, MOE_FP8_FPROP_W, 0},
        {5, 3, 67, 2, 1, 0, 0, MOE_BF16, 2, MOE_FP8_FPROP_X, MOE_FP8_FPROP_W, 0},
        {big, 130, 97, 1, 1, 1, 0, MOE_BF16, 1, MOE_FP8_FPROP_X, MOE_FP8_FPROP_W, 0},
        /* FP8 in the recipe's three products (block 32: partial tiles and blocks at the edges) */
        {37, 67, 130, 1, 0, 1, 0, MOE_FP8_E4M3, 1, MOE_FP8_FPROP_X, MOE_FP8_FPROP_W, 0},   /* Fprop: X·Wᵀ */
        {37, 130, 67, 1, 0, 0, 1, MOE_FP8_E4M3, 1, MOE_FP8_DGRAD_DY, MOE_FP8_DGRAD_W, 0}, /* Dgrad: dY·W */
        {67, 130, 37, 1, 1, 0, 0, MOE_FP8_E4M3, 1, MOE_FP8_WGRAD_DY, MOE_FP8_WGRAD_X, 0}, /* Wgrad: dYᵀ·X */
        {37, 67, 130, 2, 0, 1, 1, MOE_FP8_E4M3, 0.5, MOE_FP8_FPROP_X, MOE_FP8_FPROP_W, 1},
        {67, 130, 37, 1, 1, 0, 0, MOE_FP8_E4M3, 1, MOE_FP8_WGRAD_DY, MOE_FP8_WGRAD_X, 1},
        {big, 130, 97, 1, 0, 1, 0, MOE_FP8_E4M3, 1, MOE_FP8_FPROP_X, MOE_FP8_FPROP_W, 0},
    };
    size_t i;
    for (i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        run_gemm(&cases[i]);
        if (t_case_failures) return;
    }
}

typedef struct grouped_case {
    int group_k, tb, acc;
    moe_dtype prec;
    double alpha;
    int64_t groups, m, n, k; /* the token dimension (k with group_k, m otherwise) comes from the offsets */
    int64_t sizes[8];        /* rows per group */
} grouped_case;

static void run_grouped(const grouped_case *gc) {
    const int64_t G = gc->groups;
    int64_t off[9], R, e, i;
    int64_t m, n = gc->n, k, ca, rb, cb, lda, ldb, ldc, sb, sc, csize, asize, bsize;
    moe_real *A, *B, *C0, *out[2], *dA, *dB;
    double *ref, *mag;
    moe__gemm_op op;
    moe_fp8_role rla = gc->group_k ? MOE_FP8_WGRAD_DY : MOE_FP8_FPROP_X, rlb = gc->group_k ? MOE_FP8_WGRAD_X : MOE_FP8_FPROP_W;
    int th;
    off[0] = 0;
    for (e = 0; e < G; e++) off[e + 1] = off[e] + gc->sizes[e];
    R = off[G];
    m = gc->group_k ? gc->m : R;
    k = gc->group_k ? R : gc->k;
    /* storage of one group's operands: A [tokens, k] (m-form) or [tokens, m] (k-form, trans_a);
       B [k, n] / [n, k] per group (m-form) or [tokens, n] (k-form) */
    ca = gc->group_k ? gc->m : gc->k;
    lda = ca + 3;
    asize = R * lda + 1;
    rb = gc->group_k ? R : (gc->tb ? n : gc->k);
    cb = gc->group_k ? n : (gc->tb ? gc->k : n);
    ldb = cb + 5;
    sb = gc->group_k ? 0 : rb * ldb + 7;
    bsize = gc->group_k ? R * ldb + 1 : G * sb;
    ldc = n + 2;
    sc = gc->group_k ? gc->m * ldc + 3 : 0;
    csize = gc->group_k ? G * sc : R * ldc + 1;
    SHAPE("%s groups=%lld sizes=%lld,%lld,%lld,... m=%lld n=%lld k=%lld tb=%d acc=%d %s alpha=%g",
          gc->group_k ? "group_k" : "token rows in m", (long long)G, (long long)gc->sizes[0], (long long)gc->sizes[1],
          (long long)(G > 2 ? gc->sizes[2] : 0), (long long)m, (long long)n, (long long)k, gc->tb, gc->acc,
          moe_dtype_name(gc->prec), gc->alpha);
    A = rndr(asize, -1, 1);
    B = rndr(bsize, -1, 1);
    C0 = rndr(csize, -1, 1);
    if (!gc->acc)
        for (i = 0; i < csize; i++) C0[i] = (moe_real)NAN;
    ref = HD(csize);
    mag = HD(csize);
    for (i = 0; i < csize; i++) ref[i] = mag[i] = (double)C0[i]; /* outside every group: unchanged */
    if (gc->prec == MOE_FP8_E4M3) set_fp8(0);
    for (e = 0; e < G; e++) {
        int64_t r0 = off[e], cnt = off[e + 1] - off[e];
        double *Aq = HD(cnt * ca + 1), *Bq;
        ref_operand(A + r0 * lda, lda, cnt, ca, gc->prec, rla, Aq);
        if (gc->group_k) {
            Bq = HD(cnt * n + 1);
            ref_operand(B + r0 * ldb, ldb, cnt, n, gc->prec, rlb, Bq);
            /* C_e [m, n] = alpha·A_eᵀ·B_e over the group's tokens (none: 0) */
            ref_product(gc->m, n, cnt, Aq, 1, Bq, 0, gc->alpha, gc->acc ? C0 + e * sc : NULL, ldc, ref + e * sc, ldc, mag + e * sc);
        } else {
            Bq = HD(rb * cb);
            ref_operand(B + e * sb, ldb, rb, cb, gc->prec, rlb, Bq);
            ref_product(cnt, n, gc->k, Aq, 0, Bq, gc->tb, gc->alpha, gc->acc ? C0 + r0 * ldc : NULL, ldc, ref + r0 * ldc, ldc,
                        mag + r0 * ldc);
        }
    }
    dA = UPR(A, asize);
    dB = UPR(B, bsize);
    memset(&op, 0, sizeof op);
    op.m = m; op.n = n; op.k = k; op.batch = 1;
    op.a = dA; op.lda = lda; op.trans_a = gc->group_k;
    op.b = dB; op.ldb = ldb; op.stride_b = sb; op.trans_b = gc->tb;
    op.ldc = ldc; op.stride_c = sc;
    op.alpha = (moe_real)gc->alpha;
    op.accumulate = gc->acc;
    op.precision = gc->prec;
    op.role_a = rla; op.role_b = rlb;
    FOR_THREADS(th) {
        op.c = UPR(C0, csize);
        CALL(be->gemm_grouped(ctx, &op, G, off, gc->group_k));
        out[th - 1] = HR(csize);
        DOWNR(out[th - 1], op.c, csize);
        moe_ctx_reset(ctx);
    }
    /* as gemm: FP32 sums of k products, 4·(k + 2)·2^-24 relative to |alpha|·Σ|a·b| + |C0| */
    if (gc->group_k)
        for (e = 0; e < G; e++) {
            char what[64];
            snprintf(what, sizeof what, "C of group %lld (%lld tokens)", (long long)e, (long long)(off[e + 1] - off[e]));
            chk_gemm_c(what, out[0] + e * sc, C0 + e * sc, ref + e * sc, mag + e * sc, gc->m, n, ldc,
                       4.0 * (double)(off[e + 1] - off[e] + 2) * U24);
        }
    else
        chk_gemm_c("C", out[0], C0, ref, mag, R, n, ldc, 4.0 * (double)(gc->k + 2) * U24);
    same_bits("C", out[0], out[1], (size_t)csize * sizeof(moe_real));
}

static void t_gemm_grouped(void) {
    const int64_t b = quick ? 1 : 3; /* ×3: 2·200·130·97 flops over 6 groups, a parallel loop */
    const grouped_case cases[] = {
        {0, 1, 0, MOE_F32, 1, 5, 0, 67, 130, {0, 5, 0, 37, 1}},
        {0, 0, 1, MOE_F32, -0.5, 4, 0, 5, 67, {3, 0, 0, 1}},
        {0, 1, 1, MOE_F32, 1, 6, 0, 130, 97, {0, 12 * b, 25 * b, 0, 23 * b, 7 * b}},
        {0, 1, 0, MOE_F32, 1, 1, 0, 67, 37, {37}},
        {0, 0, 0, MOE_BF16, 1, 5, 0, 67, 130, {0, 5, 0, 37, 1}},
        {0, 1, 1, MOE_FP8_E4M3, 1, 5, 0, 67, 130, {0, 5, 0, 37, 1}},
        {1, 0, 1, MOE_F32, 1, 5, 67, 37, 0, {0, 5, 0, 37, 1}},
        {1, 0, 1, MOE_F32, 2, 6, 130, 67, 0, {0, 12 * b, 25 * b, 0, 23 * b, 7 * b}},
        {1, 0, 0, MOE_F32, 1, 5, 67, 37, 0, {5, 37, 0, 3, 1}}, /* overwrite, with an empty group: C_e = 0 */
        {1, 0, 1, MOE_BF16, 1, 4, 67, 37, 0, {3, 0, 37, 1}},
        {1, 0, 1, MOE_FP8_E4M3, 1, 4, 67, 37, 0, {3, 0, 37, 40}},
        /* B panels cut to the byte budget (n = 1024): the 1024-row group needs more memory than
           all 1030 rows would in one group; each thread's memory must be sized for it */
        {1, 0, 1, MOE_F32, 1, 2, 64, 1024, 0, {6, 1024}},
    };
    size_t i;
    for (i = 0; i < sizeof cases / sizeof cases[0]; i++) run_grouped(&cases[i]);
}

/* ============================================================================================
   rows
   ============================================================================================ */

/* rows × d shapes: ragged, and one above the split threshold (300·130 > 16384) */
static const int64_t row_shapes[][2] = {{1, 5}, {3, 67}, {37, 130}, {300, 130}, {5, 90}};
#define N_ROW_SHAPES 5

static void t_rmsnorm_fwd(void) {
    int s, th, with_rstd;
    for (s = 0; s < N_ROW_SHAPES; s++)
        for (with_rstd = 0; with_rstd < 2; with_rstd++) {
            const int64_t rows = row_shapes[s][0], d = row_shapes[s][1], ldx = d + 3, ldy = d + 1;
            moe_real *x = rndr(rows * ldx, -2, 2), *w = rndr(d, 0.5, 1.5), *y0 = nanr(rows * ldy), *yo[2], *ro[2];
            moe_real *dx = UPR(x, rows * ldx), *dw = UPR(w, d);
            double *ref = HD(rows * d), *rref = HD(rows);
            moe_real eps = (moe_real)1e-6;
            int64_t r, i;
            SHAPE("rows=%lld d=%lld ldx=%lld ldy=%lld rstd=%s", (long long)rows, (long long)d, (long long)ldx, (long long)ldy,
                  with_rstd ? "yes" : "NULL");
            for (r = 0; r < rows; r++) {
                double ss = 0, rs;
                for (i = 0; i < d; i++) ss += (double)x[r * ldx + i] * (double)x[r * ldx + i];
                rs = 1 / sqrt(ss / (double)d + (double)eps);
                rref[r] = rs;
                for (i = 0; i < d; i++) ref[r * d + i] = (double)w[i] * (double)x[r * ldx + i] * rs;
            }
            FOR_THREADS(th) {
                moe_real *dy = UPR(y0, rows * ldy), *drs = with_rstd ? UPR(nanr(rows), rows) : NULL;
                CALL(be->rmsnorm_fwd(ctx, dx, ldx, dw, rows, d, eps, dy, ldy, drs));
                yo[th - 1] = HR(rows * ldy);
                DOWNR(yo[th - 1], dy, rows * ldy);
                ro[th - 1] = HR(rows);
                if (drs) DOWNR(ro[th - 1], drs, rows);
            }
            {
                moe_real *g = HR(rows * d);
                int64_t pad = 0;
                for (r = 0; r < rows; r++) {
                    for (i = 0; i < d; i++) g[r * d + i] = yo[0][r * ldy + i];
                    pad += !real_same(yo[0][r * ldy + d], (moe_real)NAN);
                }
                T_CHECK(pad == 0, "y %s: the row padding was written", shape);
                /* the sum of d positive squares is within d·2^-24 relative, sqrt halves it, and a
                   handful of roundings follow: (d/2 + 6)·2^-24 relative, d/4 + 3 ulps */
                chk_ulp("y", g, ref, NULL, rows * d, (double)d / 4 + 3);
                if (with_rstd) chk_ulp("rstd", ro[0], rref, NULL, rows, (double)d / 4 + 3);
            }
            same_bits("y", yo[0], yo[1], (size_t)(rows * ldy) * sizeof(moe_real));
            same_bits("rstd", ro[0], ro[1], (size_t)rows * sizeof(moe_real));
        }
}

static void t_rmsnorm_bwd(void) {
    int s, th, which;
    for (s = 0; s < N_ROW_SHAPES; s++)
        for (which = 0; which < 3; which++) { /* both outputs, dx only, dw only */
            const int64_t rows = row_shapes[s][0], d = row_shapes[s][1];
            moe_real *x = rndr(rows * d, -2, 2), *w = rndr(d, 0.5, 1.5), *dy = rndr(rows * d, -1, 1), *rs = HR(rows);
            moe_real *dx0 = rndr(rows * d, -1, 1), *dw0 = rndr(d, -1, 1), *dxo[2], *dwo[2];
            moe_real *d_x, *d_w, *d_rs, *d_dy;
            double *rdx = HD(rows * d), *rdw = HD(d), *mdx = HD(rows * d), *mdw = HD(d);
            int64_t r, i;
            int want_dx = which != 2, want_dw = which != 1;
            SHAPE("rows=%lld d=%lld dx=%s dw=%s", (long long)rows, (long long)d, want_dx ? "yes" : "NULL", want_dw ? "yes" : "NULL");
            for (i = 0; i < d; i++) rdw[i] = (double)dw0[i], mdw[i] = fabs((double)dw0[i]);
            for (r = 0; r < rows; r++) {
                double ss = 0, dot = 0, adot = 0, rr;
                for (i = 0; i < d; i++) ss += (double)x[r * d + i] * (double)x[r * d + i];
                rs[r] = (moe_real)(1 / sqrt(ss / (double)d + 1e-6));
                rr = (double)rs[r];
                for (i = 0; i < d; i++) {
                    double xh = (double)x[r * d + i] * rr, g = (double)dy[r * d + i] * (double)w[i];
                    dot += g * xh;
                    adot += fabs(g * xh);
                }
                dot /= (double)d;
                adot /= (double)d;
                for (i = 0; i < d; i++) {
                    double xh = (double)x[r * d + i] * rr, g = (double)dy[r * d + i] * (double)w[i];
                    rdx[r * d + i] = (double)dx0[r * d + i] + rr * (g - xh * dot);
                    mdx[r * d + i] = fabs((double)dx0[r * d + i]) + rr * (fabs(g) + fabs(xh) * adot);
                    rdw[i] += (double)dy[r * d + i] * xh;
                    mdw[i] += fabs((double)dy[r * d + i] * xh);
                }
            }
            d_x = UPR(x, rows * d); d_w = UPR(w, d); d_rs = UPR(rs, rows); d_dy = UPR(dy, rows * d);
            FOR_THREADS(th) {
                moe_real *ddx = want_dx ? UPR(dx0, rows * d) : NULL, *ddw = want_dw ? UPR(dw0, d) : NULL;
                CALL(be->rmsnorm_bwd(ctx, d_x, d_w, d_rs, d_dy, rows, d, ddx, ddw));
                dxo[th - 1] = HR(rows * d);
                dwo[th - 1] = HR(d);
                if (ddx) DOWNR(dxo[th - 1], ddx, rows * d);
                if (ddw) DOWNR(dwo[th - 1], ddw, d);
                moe_ctx_reset(ctx);
            }
            /* dx: a d-length dot per row (d·2^-24 of Σ|g·x̂|) and a few roundings; dw: a sum over
               the rows: 4·(d + rows + 4)·2^-24 relative to the sums of absolute terms */
            if (want_dx) chk_norm("dx", dxo[0], rdx, rows * d, 4.0 * (double)(d + 4) * U24 * cond(mdx, rdx, rows * d));
            if (want_dw) chk_norm("dw", dwo[0], rdw, d, 4.0 * (double)(rows + d + 4) * U24 * cond(mdw, rdw, d));
            same_bits("dx", dxo[0], dxo[1], (size_t)(rows * d) * sizeof(moe_real));
            same_bits("dw", dwo[0], dwo[1], (size_t)d * sizeof(moe_real));
        }
}

static void t_softmax_fwd(void) {
    int s, th;
    for (s = 0; s < N_ROW_SHAPES; s++) {
        const int64_t rows = row_shapes[s][0], d = row_shapes[s][1];
        moe_real *x = rndr(rows * d, -8, 8), *yo[2], *dx = UPR(x, rows * d);
        double *ref = HD(rows * d);
        int64_t r, i;
        SHAPE("rows=%lld d=%lld", (long long)rows, (long long)d);
        for (r = 0; r < rows; r++) {
            double mx = -INFINITY, sum = 0;
            for (i = 0; i < d; i++) mx = fmax(mx, (double)x[r * d + i]);
            for (i = 0; i < d; i++) sum += exp((double)x[r * d + i] - mx);
            for (i = 0; i < d; i++) ref[r * d + i] = exp((double)x[r * d + i] - mx) / sum;
        }
        FOR_THREADS(th) {
            moe_real *dy = UPR(nanr(rows * d), rows * d);
            CALL(be->softmax_fwd(ctx, dx, rows, d, dy));
            yo[th - 1] = HR(rows * d);
            DOWNR(yo[th - 1], dy, rows * d);
        }
        /* exp within 2 ulp (moe_expf), a sum of d positive terms (d·2^-24), a division:
           (d + 8)·2^-24 relative, d/2 + 4 ulps */
        chk_ulp("y", yo[0], ref, NULL, rows * d, (double)d / 2 + 4);
        same_bits("y", yo[0], yo[1], (size_t)(rows * d) * sizeof(moe_real));
    }
}

static void t_softmax_bwd(void) {
    int s, th;
    for (s = 0; s < N_ROW_SHAPES; s++) {
        const int64_t rows = row_shapes[s][0], d = row_shapes[s][1];
        moe_real *y = HR(rows * d), *dy = rndr(rows * d, -1, 1), *dx0 = rndr(rows * d, -0.01, 0.01), *o[2];
        moe_real *d_y, *d_dy;
        double *ref = HD(rows * d), *mag = HD(rows * d);
        int64_t r, i;
        SHAPE("rows=%lld d=%lld", (long long)rows, (long long)d);
        for (r = 0; r < rows; r++) { /* y a probability row */
            double sum = 0, dot = 0, adot = 0;
            for (i = 0; i < d; i++) sum += (double)(y[r * d + i] = (moe_real)exp(4 * urand()));
            for (i = 0; i < d; i++) y[r * d + i] = (moe_real)((double)y[r * d + i] / sum);
            for (i = 0; i < d; i++) {
                dot += (double)dy[r * d + i] * (double)y[r * d + i];
                adot += fabs((double)dy[r * d + i] * (double)y[r * d + i]);
            }
            for (i = 0; i < d; i++) {
                ref[r * d + i] = (double)dx0[r * d + i] + (double)y[r * d + i] * ((double)dy[r * d + i] - dot);
                mag[r * d + i] = fabs((double)dx0[r * d + i]) + (double)y[r * d + i] * (fabs((double)dy[r * d + i]) + adot);
            }
        }
        d_y = UPR(y, rows * d); d_dy = UPR(dy, rows * d);
        FOR_THREADS(th) {
            moe_real *ddx = UPR(dx0, rows * d);
            CALL(be->softmax_bwd(ctx, d_y, d_dy, rows, d, ddx));
            o[th - 1] = HR(rows * d);
            DOWNR(o[th - 1], ddx, rows * d);
        }
        /* a d-length dot per row, then y·(dy − dot) + dx: 4·(d + 4)·2^-24 of the absolute terms */
        chk_norm("dx", o[0], ref, rows * d, 4.0 * (double)(d + 4) * U24 * cond(mag, ref, rows * d));
        same_bits("dx", o[0], o[1], (size_t)(rows * d) * sizeof(moe_real));
    }
}

/* targets of `rows` rows over V classes, every third-ish row ignored */
static int32_t *targets_of(int64_t rows, int64_t V, int32_t ignore) {
    int32_t *t = HI(rows);
    int64_t r;
    for (r = 0; r < rows; r++) t[r] = (r % 3 == 1) ? ignore : (int32_t)irand(V);
    return t;
}

static void t_xent_fwd(void) {
    int s, th;
    for (s = 0; s < N_ROW_SHAPES; s++) {
        const int64_t rows = row_shapes[s][0], V = row_shapes[s][1];
        const int32_t ignore = -100;
        moe_real *x = rndr(rows * V, -6, 6), *lo[2], sum[2];
        int32_t *t = targets_of(rows, V, ignore);
        moe_real *d_x = UPR(x, rows * V);
        int32_t *d_t = UPI(t, rows);
        double *rl = HD(rows), rs = 0, ra = 0;
        int64_t r, i, rc = 0, cnt[2];
        SHAPE("rows=%lld V=%lld", (long long)rows, (long long)V);
        for (r = 0; r < rows; r++) {
            double mx = -INFINITY, se = 0;
            for (i = 0; i < V; i++) mx = fmax(mx, (double)x[r * V + i]);
            for (i = 0; i < V; i++) se += exp((double)x[r * V + i] - mx);
            rl[r] = mx + log(se);
            if (t[r] != ignore) {
                rs += rl[r] - (double)x[r * V + t[r]];
                ra += fabs(rl[r]) + fabs((double)x[r * V + t[r]]);
                rc++;
            }
        }
        FOR_THREADS(th) {
            moe_real *d_l = UPR(nanr(rows), rows);
            CALL(be->xent_fwd(ctx, d_x, d_t, ignore, rows, V, d_l, &sum[th - 1], &cnt[th - 1]));
            lo[th - 1] = HR(rows);
            DOWNR(lo[th - 1], d_l, rows);
            moe_ctx_reset(ctx);
        }
        {
            double *mag = HD(rows), rsum = rs;
            for (r = 0; r < rows; r++) mag[r] = fmax(fabs(rl[r]), 1.0);
            /* lse = max + log(Σ e^(x − max)): the sum of V positive terms is within (V + 4)·2^-24
               relative, which log turns into as much absolute error; counted against
               max(|lse|, 1): (V + 8)/2 ulps */
            chk_ulp("lse", lo[0], rl, mag, rows, (double)(V + 8) / 2);
            /* Σ of the rows' losses: each loss within (V + 8)·2^-24·max(|lse|, 1) and a sum of
               `rows` terms: 4·(V + rows + 8)·2^-24 of Σ(|lse| + |x_t|) */
            chk_norm("host_sum", &sum[0], &rsum, 1, 4.0 * (double)(V + rows + 8) * U24 * (ra > 0 && rs != 0 ? ra / fabs(rs) : 1));
            note_err("host_count", BITEXACT, (double)(cnt[0] != rc), 0);
            T_CHECK(cnt[0] == rc, "host_count %s: %lld, want %lld", shape, (long long)cnt[0], (long long)rc);
        }
        same_bits("lse", lo[0], lo[1], (size_t)rows * sizeof(moe_real));
        same_bits("host_sum", &sum[0], &sum[1], sizeof(moe_real));
        same_bits("host_count", &cnt[0], &cnt[1], sizeof(int64_t));
    }
}

static void t_xent_bwd(void) {
    int s, th;
    for (s = 0; s < N_ROW_SHAPES; s++) {
        const int64_t rows = row_shapes[s][0], V = row_shapes[s][1];
        const int32_t ignore = -1;
        const moe_real scale = (moe_real)0.37;
        moe_real *x = rndr(rows * V, -6, 6), *lse = HR(rows), *dx0 = rndr(rows * V, -0.1, 0.1), *o[2];
        int32_t *t = targets_of(rows, V, ignore);
        double *ref = HD(rows * V), *mag = HD(rows * V);
        moe_real *d_x = UPR(x, rows * V), *d_l;
        int32_t *d_t = UPI(t, rows);
        int64_t r, i;
        SHAPE("rows=%lld V=%lld scale=%g", (long long)rows, (long long)V, (double)scale);
        for (r = 0; r < rows; r++) {
            double mx = -INFINITY, se = 0;
            for (i = 0; i < V; i++) mx = fmax(mx, (double)x[r * V + i]);
            for (i = 0; i < V; i++) se += exp((double)x[r * V + i] - mx);
            lse[r] = (moe_real)(mx + log(se));
            for (i = 0; i < V; i++) {
                double p = exp((double)x[r * V + i] - (double)lse[r]), oh = (i == t[r]) ? 1 : 0;
                int skip = t[r] == ignore;
                ref[r * V + i] = (double)dx0[r * V + i] + (skip ? 0 : (double)scale * (p - oh));
                mag[r * V + i] = fabs((double)dx0[r * V + i]) + (skip ? 0 : fabs((double)scale) * (p + oh));
            }
        }
        d_l = UPR(lse, rows);
        FOR_THREADS(th) {
            moe_real *ddx = UPR(dx0, rows * V);
            CALL(be->xent_bwd(ctx, d_x, d_t, ignore, d_l, scale, rows, V, ddx));
            o[th - 1] = HR(rows * V);
            DOWNR(o[th - 1], ddx, rows * V);
        }
        /* element-wise: exp within 2 ulp, a product and one or two additions: 4 ulps of
           |dx| + |scale|·(p + onehot) */
        chk_ulp("dx", o[0], ref, mag, rows * V, 4);
        same_bits("dx", o[0], o[1], (size_t)(rows * V) * sizeof(moe_real));
    }
}

static double ref_sigmoid(double x) { return 1 / (1 + exp(-x)); }

/* The edges of exp (its clamps at −87.3 and 88.72, ±inf, NaN, tiny values) in each of a row's
   16-, 8- and 1-lane paths: moe_silu_scalar's and moe_silu_grad_scalar's bits (CPU). */
static void t_swiglu_special(void) {
    static const float sp[9] = {NAN, INFINITY, -INFINITY, 100.0f, -100.0f, 88.8f, -87.4f, 1e-40f, -0.0f};
    enum { N = 16 + 8 + 9 };
    moe_real g[N], dy[N], y[N], dg[N];
    int64_t i, bad = 0;
    if (be != moe__cpu_backend()) return;
    SHAPE("one row of %d special values", N);
    for (i = 0; i < N; i++) g[i] = sp[i % 9], dy[i] = 0.5f;
    CALL(be->swiglu_fwd(ctx, g, NULL, N, 1, N, y, N));
    CALL(be->swiglu_bwd(ctx, g, NULL, N, dy, 1, N, dg, NULL, N, 0));
    for (i = 0; i < N; i++) bad += !real_same(y[i], moe_silu_scalar(g[i])) + !real_same(dg[i], dy[i] * 1 * moe_silu_grad_scalar(g[i]));
    T_CHECK(bad == 0, "swiglu %s: %lld values differ from the scalar functions'", shape, (long long)bad);
}

static void t_swiglu_fwd(void) {
    int s, th, with_up;
    for (s = 0; s < N_ROW_SHAPES; s++)
        for (with_up = 0; with_up < 2; with_up++) {
            const int64_t rows = row_shapes[s][0], cols = row_shapes[s][1], ld_in = 2 * cols + 1, ld_y = cols + 3;
            moe_real *in = rndr(rows * ld_in, -8, 8), *o[2], *d_in = UPR(in, rows * ld_in), *y0 = nanr(rows * ld_y);
            double *ref = HD(rows * cols);
            moe_real *g = HR(rows * cols);
            int64_t r, c, pad = 0;
            SHAPE("rows=%lld cols=%lld ld_in=%lld ld_y=%lld up=%s", (long long)rows, (long long)cols, (long long)ld_in,
                  (long long)ld_y, with_up ? "yes" : "NULL");
            for (r = 0; r < rows; r++)
                for (c = 0; c < cols; c++) {
                    double gt = (double)in[r * ld_in + c];
                    ref[r * cols + c] = gt * ref_sigmoid(gt) * (with_up ? (double)in[r * ld_in + cols + c] : 1);
                }
            FOR_THREADS(th) {
                moe_real *dy = UPR(y0, rows * ld_y);
                CALL(be->swiglu_fwd(ctx, d_in, with_up ? d_in + cols : NULL, ld_in, rows, cols, dy, ld_y));
                o[th - 1] = HR(rows * ld_y);
                DOWNR(o[th - 1], dy, rows * ld_y);
            }
            for (r = 0; r < rows; r++) {
                for (c = 0; c < cols; c++) g[r * cols + c] = o[0][r * ld_y + c];
                for (c = cols; c < ld_y; c++) pad += !real_same(o[0][r * ld_y + c], (moe_real)NAN);
            }
            T_CHECK(pad == 0, "y %s: the row padding was written", shape);
            /* σ = 1/(1 + e^−x) with e^x within 2 ulp, then two products: 6 ulps */
            chk_ulp("y", g, ref, NULL, rows * cols, 6);
            same_bits("y", o[0], o[1], (size_t)(rows * ld_y) * sizeof(moe_real));
            if (be == moe__cpu_backend()) { /* the 16-, 8- and 1-lane paths of a row: moe_silu_scalar's bits */
                int64_t bad = 0;
                for (r = 0; r < rows; r++)
                    for (c = 0; c < cols; c++) {
                        moe_real x = in[r * ld_in + c], want = with_up ? moe_silu_scalar(x) * in[r * ld_in + cols + c] : moe_silu_scalar(x);
                        bad += !real_same(g[r * cols + c], want);
                    }
                T_CHECK(bad == 0, "y %s: %lld values differ from moe_silu_scalar's", shape, (long long)bad);
            }
        }
    t_swiglu_special();
}

static void t_swiglu_bwd(void) {
    int s, th, v;
    for (s = 0; s < N_ROW_SHAPES; s++)
        for (v = 0; v < 5; v++) { /* 0: both, accumulate; 1: both, overwrite; 2: dgate only; 3: dup only; 4: up NULL */
            const int64_t rows = row_shapes[s][0], cols = row_shapes[s][1], ld_in = 2 * cols + 1, ld_d = cols + 2;
            const int acc = v == 0 || v == 2, with_up = v != 4, want_dg = v != 3, want_du = v != 2 && v != 4;
            moe_real *in = rndr(rows * ld_in, -8, 8), *dy = rndr(rows * cols, -1, 1), *d0 = rndr(rows * ld_d, -1, 1);
            moe_real *og[2], *ou[2], *d_in = UPR(in, rows * ld_in), *d_dy = UPR(dy, rows * cols);
            double *rg = HD(rows * ld_d), *ru = HD(rows * ld_d), *mg = HD(rows * ld_d), *mu = HD(rows * ld_d);
            int64_t r, c;
            SHAPE("rows=%lld cols=%lld accumulate=%d up=%s dgate=%s dup=%s", (long long)rows, (long long)cols, acc,
                  with_up ? "yes" : "NULL", want_dg ? "yes" : "NULL", want_du ? "yes" : "NULL");
            if (!acc)
                for (r = 0; r < rows * ld_d; r++) d0[r] = (moe_real)NAN;
            for (r = 0; r < rows * ld_d; r++) rg[r] = ru[r] = (double)d0[r], mg[r] = mu[r] = 0;
            for (r = 0; r < rows; r++)
                for (c = 0; c < cols; c++) {
                    double x = (double)in[r * ld_in + c], u = with_up ? (double)in[r * ld_in + cols + c] : 1, sg = ref_sigmoid(x);
                    double g = (double)dy[r * cols + c], base = acc ? (double)d0[r * ld_d + c] : 0;
                    rg[r * ld_d + c] = base + g * u * sg * (1 + x * (1 - sg));
                    /* silu' = σ + x·σ(1 − σ) cancels near x = −1.28: count against its terms */
                    mg[r * ld_d + c] = fabs(base) + fabs(g * u) * (sg + fabs(x) * sg * (1 - sg));
                    ru[r * ld_d + c] = base + g * x * sg;
                    mu[r * ld_d + c] = fabs(base) + fabs(g * x * sg);
                }
            FOR_THREADS(th) {
                moe_real *ddg = want_dg ? UPR(d0, rows * ld_d) : NULL, *ddu = want_du ? UPR(d0, rows * ld_d) : NULL;
                CALL(be->swiglu_bwd(ctx, d_in, with_up ? d_in + cols : NULL, ld_in, d_dy, rows, cols, ddg, ddu, ld_d, acc));
                og[th - 1] = copyr(d0, rows * ld_d);
                ou[th - 1] = copyr(d0, rows * ld_d);
                if (ddg) DOWNR(og[th - 1], ddg, rows * ld_d);
                if (ddu) DOWNR(ou[th - 1], ddu, rows * ld_d);
            }
            /* σ within 4 ulp (e^x, an addition, a division), then products and one addition:
               8 ulps of the terms' magnitude (padding: unchanged, 0 ulps) */
            if (want_dg) chk_ulp("dgate", og[0], rg, mg, rows * ld_d, 8);
            if (want_du) chk_ulp("dup", ou[0], ru, mu, rows * ld_d, 8);
            if (be == moe__cpu_backend()) { /* the 16-, 8- and 1-lane paths of a row: the scalar functions' bits */
                int64_t bad = 0;
                for (r = 0; r < rows; r++)
                    for (c = 0; c < cols; c++) {
                        moe_real x = in[r * ld_in + c], gy = dy[r * cols + c], base = d0[r * ld_d + c];
                        moe_real vg = gy * (with_up ? in[r * ld_in + cols + c] : 1) * moe_silu_grad_scalar(x), vu = gy * moe_silu_scalar(x);
                        if (want_dg) bad += !real_same(og[0][r * ld_d + c], acc ? base + vg : vg);
                        if (want_du) bad += !real_same(ou[0][r * ld_d + c], acc ? base + vu : vu);
                    }
                T_CHECK(bad == 0, "dgate/dup %s: %lld values differ from the scalar functions'", shape, (long long)bad);
            }
            same_bits("dgate", og[0], og[1], (size_t)(rows * ld_d) * sizeof(moe_real));
            same_bits("dup", ou[0], ou[1], (size_t)(rows * ld_d) * sizeof(moe_real));
        }
}

static void t_rope(void) {
    /* tokens, T, heads, head_stride, offset, dim, pos0 (200·8·24 > 16384: the parallel loop) */
    static const int64_t shapes[][7] = {{3, 3, 2, 7, 1, 6, 0}, {37, 13, 5, 67, 3, 14, 2}, {200, 100, 8, 24, 0, 24, 5}};
    int s, th, lay, inv;
    for (s = 0; s < 3; s++)
        for (lay = 0; lay < 2; lay++)
            for (inv = 0; inv < 2; inv++) {
                const int64_t tokens = shapes[s][0], T = shapes[s][1], H = shapes[s][2], hs = shapes[s][3], off = shapes[s][4];
                const int64_t dim = shapes[s][5], pos0 = shapes[s][6], half = dim / 2, npos = pos0 + T, n = tokens * H * hs;
                float *cs = HF(npos * dim);
                moe_real *x = rndr(n, -2, 2), *o[2];
                double *ref = HD(n), *mag = HD(n);
                float *d_cs;
                int64_t p, j, t, h, i, moved = 0;
                SHAPE("tokens=%lld T=%lld heads=%lld head_stride=%lld offset=%lld dim=%lld pos0=%lld %s%s", (long long)tokens,
                      (long long)T, (long long)H, (long long)hs, (long long)off, (long long)dim, (long long)pos0,
                      lay ? "halves" : "pairs", inv ? " inverse" : "");
                for (p = 0; p < npos; p++) /* any angles will do: the table is an input */
                    for (j = 0; j < half; j++) {
                        double a = (double)p * pow(10000.0, -2.0 * (double)j / (double)dim);
                        cs[(p * half + j) * 2] = (float)cos(a);
                        cs[(p * half + j) * 2 + 1] = (float)sin(a);
                    }
                for (i = 0; i < n; i++) ref[i] = (double)x[i], mag[i] = 0;
                for (t = 0; t < tokens; t++)
                    for (h = 0; h < H; h++) {
                        const moe_real *v = x + (t * H + h) * hs + off;
                        const float *row = cs + (pos0 + t % T) * dim;
                        double *rv = ref + (t * H + h) * hs + off, *mv = mag + (t * H + h) * hs + off;
                        for (j = 0; j < half; j++) {
                            int64_t ia = lay ? j : 2 * j, ib = lay ? j + half : 2 * j + 1;
                            double c = (double)row[2 * j], sn = (inv ? -1 : 1) * (double)row[2 * j + 1];
                            double a = (double)v[ia], b = (double)v[ib];
                            rv[ia] = a * c - b * sn;
                            rv[ib] = a * sn + b * c;
                            mv[ia] = fabs(a * c) + fabs(b * sn);
                            mv[ib] = fabs(a * sn) + fabs(b * c);
                        }
                    }
                d_cs = (float *)up(cs, (size_t)(npos * dim) * sizeof(float));
                FOR_THREADS(th) {
                    moe_real *dx = UPR(x, n);
                    CALL(be->rope(ctx, dx, tokens, T, H, hs, off, dim, d_cs, pos0, lay ? MOE_ROPE_HALVES : MOE_ROPE_PAIRS, inv));
                    o[th - 1] = HR(n);
                    DOWNR(o[th - 1], dx, n);
                }
                /* two rounded products and their rounded sum: 1.5·2^-24 of |a·c| + |b·s|, 2 ulps */
                chk_ulp("x", o[0], ref, mag, n, 2);
                for (i = 0; i < n; i++) moved += mag[i] == 0 && !real_same(o[0][i], x[i]);
                T_CHECK(moved == 0, "x %s: %lld values outside the rotated dims changed", shape, (long long)moved);
                same_bits("x", o[0], o[1], (size_t)n * sizeof(moe_real));
            }
}

/* The k largest of x[0..n), descending, ties to the lower index, NaN last. */
static void ref_topk(const moe_real *x, int64_t n, int64_t k, int32_t *idx) {
    int64_t j, i, m;
    for (j = 0; j < k; j++) {
        int64_t best = -1;
        for (i = 0; i < n; i++) {
            int taken = 0;
            for (m = 0; m < j; m++) taken |= idx[m] == (int32_t)i;
            if (taken) continue;
            if (best < 0) best = i;
            else if (x[best] != x[best]) { if (x[i] == x[i]) best = i; }
            else if (x[i] == x[i] && (double)x[i] > (double)x[best]) best = i;
        }
        idx[j] = (int32_t)best;
    }
}

/* rows, n, k (300 rows of 130 by 8 > 16384: the parallel loop) */
static const int64_t topk_shapes[][3] = {{1, 5, 1}, {3, 67, 3}, {37, 130, 8}, {300, 130, 8}, {3, 5, 5}};

static void t_topk_fwd(void) {
    int s, th;
    for (s = 0; s < 5; s++) {
        const int64_t rows = topk_shapes[s][0], n = topk_shapes[s][1], k = topk_shapes[s][2];
        moe_real *x = HR(rows * n), *vo[2], *rv = HR(rows * k), *d_x;
        int32_t *io[2], *ri = HI(rows * k);
        int64_t r, i;
        SHAPE("rows=%lld n=%lld k=%lld", (long long)rows, (long long)n, (long long)k);
        for (i = 0; i < rows * n; i++) x[i] = (moe_real)(floor(urand() * 8) / 4 - 1); /* many ties */
        for (r = 0; r < rows; r++) { /* signed zeros tie; NaNs come last */
            x[r * n + (r % n)] = (moe_real)-0.0;
            if (r % 2 == 0) x[r * n + (3 * r + 1) % n] = (moe_real)NAN;
            if (r % 4 == 0) x[r * n] = (moe_real)NAN;
        }
        for (r = 0; r < rows; r++) {
            ref_topk(x + r * n, n, k, ri + r * k);
            for (i = 0; i < k; i++) rv[r * k + i] = x[r * n + ri[r * k + i]];
        }
        d_x = UPR(x, rows * n);
        FOR_THREADS(th) {
            moe_real *dv = UPR(nanr(rows * k), rows * k);
            int32_t *di = (int32_t *)dalloc((size_t)(rows * k) * sizeof(int32_t));
            CALL(be->topk_fwd(ctx, d_x, rows, n, k, dv, di));
            vo[th - 1] = HR(rows * k);
            io[th - 1] = HI(rows * k);
            DOWNR(vo[th - 1], dv, rows * k);
            down(io[th - 1], di, (size_t)(rows * k) * sizeof(int32_t));
        }
        chk_exact_i32("idx", io[0], ri, rows * k);
        chk_exact_real("val", vo[0], rv, rows * k);
        same_bits("idx", io[0], io[1], (size_t)(rows * k) * sizeof(int32_t));
        same_bits("val", vo[0], vo[1], (size_t)(rows * k) * sizeof(moe_real));
    }
}

/* k distinct indices below n per row */
static int32_t *distinct_idx(int64_t rows, int64_t n, int64_t k) {
    int32_t *idx = HI(rows * k);
    int64_t r, j, m;
    for (r = 0; r < rows; r++)
        for (j = 0; j < k; j++) {
            int taken;
            do {
                idx[r * k + j] = (int32_t)irand(n);
                for (taken = 0, m = 0; m < j; m++) taken |= idx[r * k + m] == idx[r * k + j];
            } while (taken);
        }
    return idx;
}

static void t_topk_bwd(void) {
    int s, th;
    for (s = 0; s < 5; s++) {
        const int64_t rows = topk_shapes[s][0] * (s == 3 ? 8 : 1), n = topk_shapes[s][1], k = topk_shapes[s][2];
        moe_real *dy = rndr(rows * k, -1, 1), *dx0 = rndr(rows * n, -1, 1), *ref = copyr(dx0, rows * n), *o[2], *d_dy;
        int32_t *idx = distinct_idx(rows, n, k), *d_idx;
        int64_t r, j;
        SHAPE("rows=%lld n=%lld k=%lld", (long long)rows, (long long)n, (long long)k);
        for (r = 0; r < rows; r++)
            for (j = 0; j < k; j++) ref[r * n + idx[r * k + j]] += dy[r * k + j]; /* one rounded addition each */
        d_dy = UPR(dy, rows * k);
        d_idx = UPI(idx, rows * k);
        FOR_THREADS(th) {
            moe_real *ddx = UPR(dx0, rows * n);
            CALL(be->topk_bwd(ctx, d_dy, d_idx, rows, n, k, ddx));
            o[th - 1] = HR(rows * n);
            DOWNR(o[th - 1], ddx, rows * n);
        }
        chk_exact_real("dx", o[0], ref, rows * n);
        same_bits("dx", o[0], o[1], (size_t)(rows * n) * sizeof(moe_real));
    }
}

/* ============================================================================================
   attention
   ============================================================================================ */

/* Materialised causal attention in double: o [B, Tq, H, Dv], lse [B, H, Tq]; query i at
   position Tk − Tq + i sees keys 0..that position. */
static void ref_attention(const moe_real *q, const moe_real *k, const moe_real *v, int64_t B, int64_t Tq, int64_t Tk, int64_t H,
                          int64_t Dk, int64_t Dv, double scale, double *o, double *lse, double *omag) {
    double *s = HD(Tk);
    int64_t b, h, i, j, d;
    for (b = 0; b < B; b++)
        for (h = 0; h < H; h++)
            for (i = 0; i < Tq; i++) {
                const moe_real *qi = q + ((b * Tq + i) * H + h) * Dk;
                int64_t last = Tk - Tq + i;
                double mx = -INFINITY, sum = 0;
                for (j = 0; j <= last; j++) {
                    const moe_real *kj = k + ((b * Tk + j) * H + h) * Dk;
                    double dot = 0;
                    for (d = 0; d < Dk; d++) dot += (double)qi[d] * (double)kj[d];
                    s[j] = scale * dot;
                    mx = fmax(mx, s[j]);
                }
                for (j = 0; j <= last; j++) sum += (s[j] = exp(s[j] - mx));
                lse[(b * H + h) * Tq + i] = mx + log(sum);
                for (d = 0; d < Dv; d++) {
                    double acc = 0, am = 0;
                    for (j = 0; j <= last; j++) {
                        double vv = (double)v[((b * Tk + j) * H + h) * Dv + d];
                        acc += s[j] / sum * vv;
                        am += s[j] / sum * fabs(vv);
                    }
                    o[((b * Tq + i) * H + h) * Dv + d] = acc;
                    if (omag) omag[((b * Tq + i) * H + h) * Dv + d] = am;
                }
            }
}

static void t_attention_fwd(void) {
    /* B, Tq, Tk, H, Dk, Dv: one tile, several tiles with Tq < Tk, and enough jobs to split */
    static const int64_t shapes[][6] = {{1, 5, 5, 1, 5, 3}, {2, 37, 70, 3, 24, 17}, {1, 130, 130, 2, 32, 32}, {1, 1, 67, 4, 16, 16}};
    int s, th;
    for (s = 0; s < 4; s++) {
        const int64_t B = shapes[s][0], Tq = shapes[s][1], Tk = shapes[s][2], H = shapes[s][3], Dk = shapes[s][4], Dv = shapes[s][5];
        const double scale = 1 / sqrt((double)Dk);
        moe_real *q = rndr(B * Tq * H * Dk, -2, 2), *k = rndr(B * Tk * H * Dk, -2, 2), *v = rndr(B * Tk * H * Dv, -1, 1);
        moe_real *oo[2], *lo[2], *d_q = UPR(q, B * Tq * H * Dk), *d_k = UPR(k, B * Tk * H * Dk), *d_v = UPR(v, B * Tk * H * Dv);
        double *ro = HD(B * Tq * H * Dv), *rl = HD(B * H * Tq), *mo = HD(B * Tq * H * Dv), *ml = HD(B * H * Tq);
        int64_t i;
        SHAPE("B=%lld Tq=%lld Tk=%lld H=%lld Dk=%lld Dv=%lld", (long long)B, (long long)Tq, (long long)Tk, (long long)H,
              (long long)Dk, (long long)Dv);
        ref_attention(q, k, v, B, Tq, Tk, H, Dk, Dv, scale, ro, rl, mo);
        for (i = 0; i < B * H * Tq; i++) ml[i] = fabs(rl[i]) + 1;
        FOR_THREADS(th) {
            moe_real *d_o = UPR(nanr(B * Tq * H * Dv), B * Tq * H * Dv), *d_l = UPR(nanr(B * H * Tq), B * H * Tq);
            CALL(be->attention_fwd(ctx, d_q, d_k, d_v, B, Tq, Tk, H, Dk, Dv, (moe_real)scale, d_o, d_l));
            oo[th - 1] = HR(B * Tq * H * Dv);
            lo[th - 1] = HR(B * H * Tq);
            DOWNR(oo[th - 1], d_o, B * Tq * H * Dv);
            DOWNR(lo[th - 1], d_l, B * H * Tq);
            moe_ctx_reset(ctx);
        }
        /* scores: Dk-length dots; softmax sums and P·V sums over up to Tk keys (an online
           softmax rescales a few times): 4·(Dk + Tk + 8)·2^-24 relative to Σ p·|v| (o) and
           to |lse| + 1 (lse, absolute errors of the sum become absolute errors of its log) */
        chk_norm("o", oo[0], ro, B * Tq * H * Dv, 4.0 * (double)(Dk + Tk + 8) * U24 * cond(mo, ro, B * Tq * H * Dv));
        chk_norm("lse", lo[0], rl, B * H * Tq, 4.0 * (double)(Dk + Tk + 8) * U24 * cond(ml, rl, B * H * Tq));
        same_bits("o", oo[0], oo[1], (size_t)(B * Tq * H * Dv) * sizeof(moe_real));
        same_bits("lse", lo[0], lo[1], (size_t)(B * H * Tq) * sizeof(moe_real));
#if defined(MOE__GEMM_HAVE_AVX512)
        if (be == moe__cpu_backend()) { /* tiles on the other FP32 kernel (6×32 zmm or 6×16 ymm): the same bits */
            moe_real *d_o = UPR(nanr(B * Tq * H * Dv), B * Tq * H * Dv), *d_l = UPR(nanr(B * H * Tq), B * H * Tq);
            ctx->conf.f32_zmm = !ctx->conf.f32_zmm;
            CALL(be->attention_fwd(ctx, d_q, d_k, d_v, B, Tq, Tk, H, Dk, Dv, (moe_real)scale, d_o, d_l));
            ctx->conf.f32_zmm = !ctx->conf.f32_zmm;
            T_CHECK(memcmp(oo[0], d_o, (size_t)(B * Tq * H * Dv) * sizeof(moe_real)) == 0 &&
                        memcmp(lo[0], d_l, (size_t)(B * H * Tq) * sizeof(moe_real)) == 0,
                    "attention_fwd %s: the 6x16 and 6x32 FP32 kernels give different bits", shape);
            moe_ctx_reset(ctx);
        }
#endif
    }
}

static void t_attention_bwd(void) {
    /* B, T, H, Dk, Dv: one tile, two tiles (64 keys each) with ragged ends */
    static const int64_t shapes[][5] = {{1, 5, 1, 5, 3}, {2, 67, 2, 20, 13}, {1, 130, 2, 24, 16}, {1, 70, 2, 48, 32}};
    int s, th, which;
    for (s = 0; s < 4; s++)
        for (which = 0; which < 2; which++) { /* all three gradients; dq NULL and dv NULL */
            const int64_t B = shapes[s][0], T = shapes[s][1], H = shapes[s][2], Dk = shapes[s][3], Dv = shapes[s][4];
            const int64_t nq = B * T * H * Dk, nv = B * T * H * Dv;
            const double scale = 1 / sqrt((double)Dk);
            moe_real *q = rndr(nq, -2, 2), *k = rndr(nq, -2, 2), *v = rndr(nv, -1, 1), *dout = rndr(nv, -1, 1);
            moe_real *o = HR(nv), *lse = HR(B * H * T), *dq0 = rndr(nq, -0.1, 0.1), *dk0 = rndr(nq, -0.1, 0.1), *dv0 = rndr(nv, -0.1, 0.1);
            moe_real *oq[2], *ok[2], *ov[2];
            double *ro = HD(nv), *rl = HD(B * H * T), *rq = HD(nq), *rk = HD(nq), *rv = HD(nv), *p = HD(T), *dp = HD(T);
            double *mq = HD(nq), *mk = HD(nq), *mv = HD(nv);
            moe_real *d_q, *d_k, *d_v, *d_o, *d_l, *d_do;
            int64_t b, h, i, j, d;
            SHAPE("B=%lld T=%lld H=%lld Dk=%lld Dv=%lld%s", (long long)B, (long long)T, (long long)H, (long long)Dk, (long long)Dv,
                  which ? " dq=NULL dv=NULL" : "");
            ref_attention(q, k, v, B, T, T, H, Dk, Dv, scale, ro, rl, NULL);
            for (i = 0; i < nv; i++) o[i] = (moe_real)ro[i];
            for (i = 0; i < B * H * T; i++) lse[i] = (moe_real)rl[i];
            for (i = 0; i < nq; i++) rq[i] = (double)dq0[i], rk[i] = (double)dk0[i], mq[i] = fabs(rq[i]), mk[i] = fabs(rk[i]);
            for (i = 0; i < nv; i++) rv[i] = (double)dv0[i], mv[i] = fabs(rv[i]);
            /* from the inputs o and lse as given: p = exp(scale·q·k − lse), dp = dO·v,
               delta = dO·o, ds = p·(dp − delta); dq = scale·Σ ds·k, dk = scale·Σ ds·q, dv = Σ p·dO */
            for (b = 0; b < B; b++)
                for (h = 0; h < H; h++)
                    for (i = 0; i < T; i++) {
                        const moe_real *qi = q + ((b * T + i) * H + h) * Dk, *doi = dout + ((b * T + i) * H + h) * Dv;
                        const moe_real *oi = o + ((b * T + i) * H + h) * Dv;
                        double delta = 0, adelta = 0;
                        for (d = 0; d < Dv; d++) delta += (double)doi[d] * (double)oi[d], adelta += fabs((double)doi[d] * (double)oi[d]);
                        for (j = 0; j <= i; j++) {
                            const moe_real *kj = k + ((b * T + j) * H + h) * Dk, *vj = v + ((b * T + j) * H + h) * Dv;
                            double dot = 0, dpd = 0, ds, ads;
                            for (d = 0; d < Dk; d++) dot += (double)qi[d] * (double)kj[d];
                            for (d = 0; d < Dv; d++) dpd += (double)doi[d] * (double)vj[d];
                            p[j] = exp(scale * dot - (double)lse[(b * H + h) * T + i]);
                            dp[j] = dpd;
                            ds = p[j] * (dpd - delta);
                            ads = p[j] * (fabs(dpd) + adelta);
                            for (d = 0; d < Dk; d++) {
                                rq[((b * T + i) * H + h) * Dk + d] += scale * ds * (double)kj[d];
                                mq[((b * T + i) * H + h) * Dk + d] += scale * ads * fabs((double)kj[d]);
                                rk[((b * T + j) * H + h) * Dk + d] += scale * ds * (double)qi[d];
                                mk[((b * T + j) * H + h) * Dk + d] += scale * ads * fabs((double)qi[d]);
                            }
                            for (d = 0; d < Dv; d++) {
                                rv[((b * T + j) * H + h) * Dv + d] += p[j] * (double)doi[d];
                                mv[((b * T + j) * H + h) * Dv + d] += p[j] * fabs((double)doi[d]);
                            }
                        }
                    }
            d_q = UPR(q, nq); d_k = UPR(k, nq); d_v = UPR(v, nv); d_o = UPR(o, nv); d_l = UPR(lse, B * H * T); d_do = UPR(dout, nv);
            FOR_THREADS(th) {
                moe_real *ddq = which ? NULL : UPR(dq0, nq), *ddk = UPR(dk0, nq), *ddv = which ? NULL : UPR(dv0, nv);
                CALL(be->attention_bwd(ctx, d_q, d_k, d_v, d_o, d_l, d_do, B, T, H, Dk, Dv, (moe_real)scale, ddq, ddk, ddv));
                oq[th - 1] = HR(nq); ok[th - 1] = HR(nq); ov[th - 1] = HR(nv);
                if (ddq) DOWNR(oq[th - 1], ddq, nq);
                DOWNR(ok[th - 1], ddk, nq);
                if (ddv) DOWNR(ov[th - 1], ddv, nv);
                moe_ctx_reset(ctx);
            }
            /* dots of Dk and Dv, sums over up to T keys or queries, and p through exp: 
               4·(Dk + Dv + T + 8)·2^-24 relative to the sums of absolute terms */
            {
                double tol = 4.0 * (double)(Dk + Dv + T + 8) * U24;
                if (!which) chk_norm("dq", oq[0], rq, nq, tol * cond(mq, rq, nq));
                chk_norm("dk", ok[0], rk, nq, tol * cond(mk, rk, nq));
                if (!which) chk_norm("dv", ov[0], rv, nv, tol * cond(mv, rv, nv));
            }
            same_bits("dq", oq[0], oq[1], (size_t)nq * sizeof(moe_real));
            same_bits("dk", ok[0], ok[1], (size_t)nq * sizeof(moe_real));
            same_bits("dv", ov[0], ov[1], (size_t)nv * sizeof(moe_real));
#if defined(MOE__GEMM_HAVE_AVX512)
            if (be == moe__cpu_backend()) { /* tiles on the other FP32 kernel (6×32 zmm or 6×16 ymm): the same bits */
                moe_real *ddq = which ? NULL : UPR(dq0, nq), *ddk = UPR(dk0, nq), *ddv = which ? NULL : UPR(dv0, nv);
                ctx->conf.f32_zmm = !ctx->conf.f32_zmm;
                CALL(be->attention_bwd(ctx, d_q, d_k, d_v, d_o, d_l, d_do, B, T, H, Dk, Dv, (moe_real)scale, ddq, ddk, ddv));
                ctx->conf.f32_zmm = !ctx->conf.f32_zmm;
                T_CHECK((!ddq || memcmp(oq[0], ddq, (size_t)nq * sizeof(moe_real)) == 0) &&
                            memcmp(ok[0], ddk, (size_t)nq * sizeof(moe_real)) == 0 &&
                            (!ddv || memcmp(ov[0], ddv, (size_t)nv * sizeof(moe_real)) == 0),
                        "attention_bwd %s: the 6x16 and 6x32 FP32 kernels give different bits", shape);
                moe_ctx_reset(ctx);
            }
#endif
        }
}

static void t_attention_decode(void) {
    /* n, H, R, width, pos0 (5·4 pairs of 65 rows·134 / 16 > 16384: the parallel loop) */
    static const int64_t shapes[][5] = {{1, 3, 37, 29, 10}, {5, 4, 67, 67, 60}, {3, 1, 5, 3, 0}};
    int s, th;
    for (s = 0; s < 3; s++) {
        const int64_t n = shapes[s][0], H = shapes[s][1], R = shapes[s][2], W = shapes[s][3], pos0 = shapes[s][4];
        const double scale = 1 / sqrt((double)R);
        moe_real *qc = rndr(n * H * R, -2, 2), *cache = rndr((pos0 + n) * R, -2, 2), *oo[2];
        moe_real *d_qc = UPR(qc, n * H * R), *d_c = UPR(cache, (pos0 + n) * R);
        double *ref = HD(n * H * W), *mag = HD(n * H * W), *sc = HD(pos0 + n);
        int64_t t, h, j, i;
        SHAPE("n=%lld H=%lld R=%lld width=%lld pos0=%lld", (long long)n, (long long)H, (long long)R, (long long)W, (long long)pos0);
        for (t = 0; t < n; t++)
            for (h = 0; h < H; h++) {
                const moe_real *qh = qc + (t * H + h) * R;
                double mx = -INFINITY, sum = 0;
                for (j = 0; j <= pos0 + t; j++) {
                    double dot = 0;
                    for (i = 0; i < R; i++) dot += (double)qh[i] * (double)cache[j * R + i];
                    sc[j] = scale * dot;
                    mx = fmax(mx, sc[j]);
                }
                for (j = 0; j <= pos0 + t; j++) sum += (sc[j] = exp(sc[j] - mx));
                for (i = 0; i < W; i++) {
                    double acc = 0, am = 0;
                    for (j = 0; j <= pos0 + t; j++) acc += sc[j] / sum * (double)cache[j * R + i], am += sc[j] / sum * fabs((double)cache[j * R + i]);
                    ref[(t * H + h) * W + i] = acc;
                    mag[(t * H + h) * W + i] = am;
                }
            }
        FOR_THREADS(th) {
            moe_real *d_o = UPR(nanr(n * H * W), n * H * W);
            CALL(be->attention_decode(ctx, d_qc, d_c, n, H, R, W, pos0, (moe_real)scale, d_o));
            oo[th - 1] = HR(n * H * W);
            DOWNR(oo[th - 1], d_o, n * H * W);
            moe_ctx_reset(ctx);
        }
        /* R-length dots, a softmax and a weighted sum over pos0 + n rows: 4·(R + pos0 + n + 8)·2^-24
           relative to Σ p·|cache| */
        chk_norm("ob", oo[0], ref, n * H * W, 4.0 * (double)(R + pos0 + n + 8) * U24 * cond(mag, ref, n * H * W));
        same_bits("ob", oo[0], oo[1], (size_t)(n * H * W) * sizeof(moe_real));
    }
}

/* ============================================================================================
   MLA, MoE
   ============================================================================================ */

static void t_mla_split_kv(void) {
    /* n, H, dn, dr, dv, ld_kpe (130·8·40 > 16384: the parallel loop) */
    static const int64_t shapes[][6] = {{1, 1, 3, 2, 5, 2}, {37, 3, 16, 7, 13, 9}, {130, 8, 16, 8, 16, 11}};
    int s, th;
    for (s = 0; s < 3; s++) {
        const int64_t n = shapes[s][0], H = shapes[s][1], dn = shapes[s][2], dr = shapes[s][3], dv = shapes[s][4], ld = shapes[s][5];
        const int64_t nk = n * H * (dn + dr), nv = n * H * dv;
        moe_real *kvb = rndr(n * H * (dn + dv), -1, 1), *kpe = rndr(n * ld, -1, 1), *rk = HR(nk), *rv = HR(nv), *ok[2], *ov[2];
        moe_real *d_kvb = UPR(kvb, n * H * (dn + dv)), *d_kpe = UPR(kpe, n * ld);
        int64_t t, h, j;
        SHAPE("n=%lld H=%lld dn=%lld dr=%lld dv=%lld ld_kpe=%lld", (long long)n, (long long)H, (long long)dn, (long long)dr,
              (long long)dv, (long long)ld);
        for (t = 0; t < n; t++)
            for (h = 0; h < H; h++) {
                for (j = 0; j < dn; j++) rk[(t * H + h) * (dn + dr) + j] = kvb[(t * H + h) * (dn + dv) + j];
                for (j = 0; j < dr; j++) rk[(t * H + h) * (dn + dr) + dn + j] = kpe[t * ld + j];
                for (j = 0; j < dv; j++) rv[(t * H + h) * dv + j] = kvb[(t * H + h) * (dn + dv) + dn + j];
            }
        FOR_THREADS(th) {
            moe_real *d_k = UPR(nanr(nk), nk), *d_v = UPR(nanr(nv), nv);
            CALL(be->mla_split_kv(ctx, d_kvb, d_kpe, ld, n, H, dn, dr, dv, d_k, d_v));
            ok[th - 1] = HR(nk); ov[th - 1] = HR(nv);
            DOWNR(ok[th - 1], d_k, nk);
            DOWNR(ov[th - 1], d_v, nv);
        }
        chk_exact_real("k", ok[0], rk, nk);
        chk_exact_real("v", ov[0], rv, nv);
        same_bits("k", ok[0], ok[1], (size_t)nk * sizeof(moe_real));
        same_bits("v", ov[0], ov[1], (size_t)nv * sizeof(moe_real));
    }
}

static void t_mla_merge_kv(void) {
    static const int64_t shapes[][5] = {{1, 1, 3, 2, 5}, {37, 3, 16, 7, 13}, {130, 8, 16, 8, 16}};
    int s, th;
    for (s = 0; s < 3; s++) {
        const int64_t n = shapes[s][0], H = shapes[s][1], dn = shapes[s][2], dr = shapes[s][3], dv = shapes[s][4];
        const int64_t nk = n * H * (dn + dr), nv = n * H * dv, nb = n * H * (dn + dv);
        moe_real *dk = rndr(nk, -1, 1), *dvv = rndr(nv, -1, 1), *pe0 = rndr(n * dr, -1, 1), *rb = HR(nb), *rp = copyr(pe0, n * dr);
        moe_real *ob[2], *op[2], *d_dk = UPR(dk, nk), *d_dv = UPR(dvv, nv);
        int64_t t, h, j;
        SHAPE("n=%lld H=%lld dn=%lld dr=%lld dv=%lld", (long long)n, (long long)H, (long long)dn, (long long)dr, (long long)dv);
        for (t = 0; t < n; t++)
            for (h = 0; h < H; h++) {
                for (j = 0; j < dn; j++) rb[(t * H + h) * (dn + dv) + j] = dk[(t * H + h) * (dn + dr) + j];
                for (j = 0; j < dv; j++) rb[(t * H + h) * (dn + dv) + dn + j] = dvv[(t * H + h) * dv + j];
                /* dkpe += dk_pe of each head, heads in order, each addition rounded in moe_real */
                for (j = 0; j < dr; j++) rp[t * dr + j] += dk[(t * H + h) * (dn + dr) + dn + j];
            }
        FOR_THREADS(th) {
            moe_real *d_b = UPR(nanr(nb), nb), *d_p = UPR(pe0, n * dr);
            CALL(be->mla_merge_kv(ctx, d_dk, d_dv, n, H, dn, dr, dv, d_b, d_p));
            ob[th - 1] = HR(nb); op[th - 1] = HR(n * dr);
            DOWNR(ob[th - 1], d_b, nb);
            DOWNR(op[th - 1], d_p, n * dr);
        }
        chk_exact_real("dkvb", ob[0], rb, nb);
        chk_exact_real("dkpe", op[0], rp, n * dr);
        same_bits("dkvb", ob[0], ob[1], (size_t)nb * sizeof(moe_real));
        same_bits("dkpe", op[0], op[1], (size_t)(n * dr) * sizeof(moe_real));
    }
}

static moe_config router_cfg(int64_t E, int64_t K, int64_t G, int64_t tg, moe_scoring sc, moe_topk_method tm, int norm, double Rs) {
    moe_config c;
    memset(&c, 0, sizeof c);
    c.n_routed_experts = E; c.num_experts_per_tok = K; c.n_group = G; c.topk_group = tg;
    c.scoring_func = sc; c.topk_method = tm; c.norm_topk_prob = norm; c.routed_scaling_factor = Rs;
    return c;
}
#define N_ROUTER_CFGS 4
static moe_config router_cfgs(int i) {
    switch (i) {
    case 0: return router_cfg(16, 3, 4, 2, MOE_SCORING_SIGMOID, MOE_TOPK_NOAUX_TC, 1, 2.5);
    case 1: return router_cfg(64, 8, 8, 4, MOE_SCORING_SIGMOID, MOE_TOPK_NOAUX_TC, 1, 2.5); /* V3's routing, scaled down */
    case 2: return router_cfg(13, 3, 1, 1, MOE_SCORING_SOFTMAX, MOE_TOPK_GREEDY, 0, 1.0);
    default: return router_cfg(12, 2, 4, 2, MOE_SCORING_SOFTMAX, MOE_TOPK_GROUP_LIMITED_GREEDY, 0, 1.5);
    }
}

/* The routing of one token from its scores s (as the backend computed them): keys s + bias
   (noaux_tc) or s; with groups (not greedy, G > 1, topk_group < G) only the topk_group best
   groups are kept (a group's score: the sum of its two best keys for noaux_tc, its best key
   for group-limited greedy; ties to the lower group); then the K best kept experts, best
   first, ties to the lower index. */
static void ref_route(const moe_config *c, const moe_real *s, const moe_real *bias, int32_t *chosen) {
    const int64_t E = c->n_routed_experts, G = c->n_group, per = E / G, K = c->num_experts_per_tok;
    double key[256], gs[256];
    int keep[256] = {0};
    int64_t e, g, j, m;
    if (E > 256) die("ref_route: at most 256 experts");
    for (e = 0; e < E; e++) key[e] = (double)s[e] + (c->topk_method == MOE_TOPK_NOAUX_TC ? (double)bias[e] : 0);
    if (c->topk_method != MOE_TOPK_GREEDY && G > 1 && c->topk_group < G) {
        for (g = 0; g < G; g++) {
            double b1 = -INFINITY, b2 = -INFINITY;
            for (e = g * per; e < (g + 1) * per; e++) {
                if (key[e] > b1) b2 = b1, b1 = key[e];
                else if (key[e] > b2) b2 = key[e];
            }
            gs[g] = c->topk_method == MOE_TOPK_NOAUX_TC ? b1 + (per > 1 ? b2 : 0) : b1;
        }
        for (j = 0; j < c->topk_group; j++) {
            int64_t best = -1;
            for (g = 0; g < G; g++)
                if (!keep[g] && (best < 0 || gs[g] > gs[best])) best = g;
            keep[best] = 1;
        }
        for (e = 0; e < E; e++)
            if (!keep[e / per]) key[e] = -INFINITY;
    }
    for (j = 0; j < K; j++) {
        int64_t best = -1;
        for (e = 0; e < E; e++) {
            int taken = 0;
            for (m = 0; m < j; m++) taken |= chosen[m] == (int32_t)e;
            if (!taken && (best < 0 || key[e] > key[best])) best = e;
        }
        chosen[j] = (int32_t)best;
    }
}

static void t_router_fwd(void) {
    static const int64_t ns[] = {1, 37, 300}; /* 300 tokens·64 experts·12 > 16384: the parallel loop */
    int ci, ni, th;
    for (ci = 0; ci < N_ROUTER_CFGS; ci++)
        for (ni = 0; ni < 3; ni++) {
            const moe_config c = router_cfgs(ci);
            const int64_t n = ns[ni], E = c.n_routed_experts, K = c.num_experts_per_tok;
            moe_real *z = rndr(n * E, -4, 4), *bias = rndr(E, -0.3, 0.3), *so[2], *go[2], *uo[2];
            int32_t *co[2], *rc = HI(n * K);
            double *rs = HD(n * E), *rg = HD(n * K), *ru = HD(n);
            moe_real *d_z = UPR(z, n * E), *d_b = UPR(bias, E);
            int64_t t, e, j;
            SHAPE("n=%lld E=%lld K=%lld groups=%lld/%lld %s %s norm=%d", (long long)n, (long long)E, (long long)K,
                  (long long)c.topk_group, (long long)c.n_group, c.scoring_func == MOE_SCORING_SIGMOID ? "sigmoid" : "softmax",
                  c.topk_method == MOE_TOPK_NOAUX_TC ? "noaux_tc" : c.topk_method == MOE_TOPK_GREEDY ? "greedy" : "group_limited_greedy",
                  c.norm_topk_prob);
            for (t = 0; t < n; t++) {
                double mx = -INFINITY, sum = 0;
                for (e = 0; e < E; e++) mx = fmax(mx, (double)z[t * E + e]);
                for (e = 0; e < E; e++) sum += exp((double)z[t * E + e] - mx);
                for (e = 0; e < E; e++)
                    rs[t * E + e] = c.scoring_func == MOE_SCORING_SIGMOID ? ref_sigmoid((double)z[t * E + e]) : exp((double)z[t * E + e] - mx) / sum;
            }
            FOR_THREADS(th) {
                moe_real *d_s = UPR(nanr(n * E), n * E), *d_g = UPR(nanr(n * K), n * K), *d_u = UPR(nanr(n), n);
                int32_t *d_c = (int32_t *)dalloc((size_t)(n * K) * sizeof(int32_t));
                CALL(be->router_fwd(ctx, &c, d_z, d_b, n, d_s, d_c, d_g, d_u));
                so[th - 1] = HR(n * E); go[th - 1] = HR(n * K); uo[th - 1] = HR(n); co[th - 1] = HI(n * K);
                DOWNR(so[th - 1], d_s, n * E);
                DOWNR(go[th - 1], d_g, n * K);
                DOWNR(uo[th - 1], d_u, n);
                down(co[th - 1], d_c, (size_t)(n * K) * sizeof(int32_t));
            }
            /* scores: sigmoid (e^x within 2 ulp, an addition, a division: 4 ulps) or a softmax
               of E (E/2 + 4 ulps, as softmax_fwd) */
            chk_ulp("s", so[0], rs, NULL, n * E, c.scoring_func == MOE_SCORING_SIGMOID ? 4 : (double)E / 2 + 4);
            /* the choices from the backend's own scores: exact */
            for (t = 0; t < n; t++) {
                double sum = 0;
                ref_route(&c, so[0] + t * E, bias, rc + t * K);
                for (j = 0; j < K; j++) sum += (double)so[0][t * E + rc[t * K + j]];
                ru[t] = sum;
                for (j = 0; j < K; j++) rg[t * K + j] = c.routed_scaling_factor * (double)so[0][t * E + rc[t * K + j]] / (c.norm_topk_prob ? sum : 1);
            }
            chk_exact_i32("chosen", co[0], rc, n * K);
            /* a sum of K positive scores (K/2 ulps), a division and a product: K/2 + 3 ulps */
            chk_ulp("sel_sum", uo[0], ru, NULL, n, (double)K / 2 + 1);
            chk_ulp("gates", go[0], rg, NULL, n * K, (double)K / 2 + 3);
            same_bits("s", so[0], so[1], (size_t)(n * E) * sizeof(moe_real));
            same_bits("chosen", co[0], co[1], (size_t)(n * K) * sizeof(int32_t));
            same_bits("gates", go[0], go[1], (size_t)(n * K) * sizeof(moe_real));
            same_bits("sel_sum", uo[0], uo[1], (size_t)n * sizeof(moe_real));
        }
}

/* Scores [n, E] of a router (sigmoid or softmax of random logits) and K distinct choices. */
static void router_inputs(const moe_config *c, int64_t n, moe_real *s, int32_t *chosen, moe_real *sel_sum) {
    const int64_t E = c->n_routed_experts, K = c->num_experts_per_tok;
    int64_t t, e, j;
    int32_t *idx = distinct_idx(n, E, K);
    for (t = 0; t < n; t++) {
        double sum = 0, tot = 0;
        for (e = 0; e < E; e++) {
            double zz = 4 * urand() - 2;
            s[t * E + e] = (moe_real)(c->scoring_func == MOE_SCORING_SIGMOID ? ref_sigmoid(zz) : exp(zz));
            tot += (double)s[t * E + e];
        }
        if (c->scoring_func == MOE_SCORING_SOFTMAX)
            for (e = 0; e < E; e++) s[t * E + e] = (moe_real)((double)s[t * E + e] / tot);
        for (j = 0; j < K; j++) {
            chosen[t * K + j] = idx[t * K + j];
            sum += (double)s[t * E + idx[t * K + j]];
        }
        if (sel_sum) sel_sum[t] = (moe_real)sum;
    }
}

static void t_router_bwd(void) {
    static const int64_t ns[][2] = {{1, 1}, {37, 37}, {300, 100}}; /* tokens, tokens per sequence */
    int ci, ni, th, bal;
    for (ci = 0; ci < N_ROUTER_CFGS; ci++)
        for (ni = 0; ni < 3; ni++)
            for (bal = 0; bal < 2; bal++) {
                const moe_config c = router_cfgs(ci);
                const int64_t n = ns[ni][0], T = ns[ni][1], E = c.n_routed_experts, K = c.num_experts_per_tok;
                const double bs = bal ? 0.01 : 0, Rs = c.routed_scaling_factor;
                moe_real *s = HR(n * E), *u = HR(n), *dg = rndr(n * K, -1, 1), *f = rndr((n / T) * E, 0, 3), *o[2];
                int32_t *ch = HI(n * K);
                double *ref = HD(n * E), *mag = HD(n * E), *ds = HD(E), *dsa = HD(E);
                moe_real *d_s, *d_u, *d_g, *d_f;
                int32_t *d_c;
                int64_t t, e, j;
                SHAPE("n=%lld T=%lld E=%lld K=%lld %s norm=%d balance_scale=%g", (long long)n, (long long)T, (long long)E,
                      (long long)K, c.scoring_func == MOE_SCORING_SIGMOID ? "sigmoid" : "softmax", c.norm_topk_prob, bs);
                router_inputs(&c, n, s, ch, u);
                /* gates g_k = Rs·s_k/Σ (or Rs·s_k) → ds; the balance term bs·Σ_i f_i·s_i/Σ_j s_j (the
                   loss's gradient per token: P's 1/T is in bs, see the report) → ds; ds → dz
                   through σ' = s(1 − s) or the softmax's Jacobian */
                for (t = 0; t < n; t++) {
                    const moe_real *st = s + t * E;
                    const double sum = (double)u[t];
                    double corr = 0, acorr = 0, tot = 0, dot = 0, adot = 0;
                    for (e = 0; e < E; e++) ds[e] = dsa[e] = 0;
                    for (j = 0; j < K; j++) corr += (double)dg[t * K + j] * (double)st[ch[t * K + j]] / sum,
                                            acorr += fabs((double)dg[t * K + j] * (double)st[ch[t * K + j]] / sum);
                    for (j = 0; j < K; j++) {
                        int32_t x = ch[t * K + j];
                        ds[x] += c.norm_topk_prob ? Rs / sum * ((double)dg[t * K + j] - corr) : Rs * (double)dg[t * K + j];
                        dsa[x] += c.norm_topk_prob ? Rs / sum * (fabs((double)dg[t * K + j]) + acorr) : Rs * fabs((double)dg[t * K + j]);
                    }
                    if (bs != 0) {
                        const moe_real *ft = f + (t / T) * E;
                        double fdot = 0;
                        for (e = 0; e < E; e++) tot += (double)st[e];
                        for (e = 0; e < E; e++) fdot += (double)ft[e] * (double)st[e] / tot;
                        for (e = 0; e < E; e++) ds[e] += bs * ((double)ft[e] - fdot) / tot, dsa[e] += bs * ((double)ft[e] + fdot) / tot;
                    }
                    for (e = 0; e < E; e++) dot += ds[e] * (double)st[e], adot += dsa[e] * (double)st[e];
                    for (e = 0; e < E; e++) {
                        double se = (double)st[e];
                        if (c.scoring_func == MOE_SCORING_SIGMOID) {
                            ref[t * E + e] = ds[e] * se * (1 - se);
                            mag[t * E + e] = dsa[e] * se * (1 - se);
                        } else {
                            ref[t * E + e] = se * (ds[e] - dot);
                            mag[t * E + e] = se * (dsa[e] + adot);
                        }
                    }
                }
                d_s = UPR(s, n * E); d_u = UPR(u, n); d_g = UPR(dg, n * K); d_f = UPR(f, (n / T) * E); d_c = UPI(ch, n * K);
                FOR_THREADS(th) {
                    moe_real *d_z = UPR(nanr(n * E), n * E);
                    CALL(be->router_bwd(ctx, &c, d_s, d_c, d_u, d_g, d_f, (moe_real)bs, n, T, d_z));
                    o[th - 1] = HR(n * E);
                    DOWNR(o[th - 1], d_z, n * E);
                }
                /* sums over K choices and E experts: 4·(E + K + 8)·2^-24 of the absolute terms */
                chk_norm("dz", o[0], ref, n * E, 4.0 * (double)(E + K + 8) * U24 * cond(mag, ref, n * E));
                same_bits("dz", o[0], o[1], (size_t)(n * E) * sizeof(moe_real));
            }
}

static void t_balance_loss(void) {
    static const int64_t shapes[][2] = {{1, 5}, {3, 37}, {2, 64}}; /* B, T */
    int s, ci, th;
    for (s = 0; s < 3; s++)
        for (ci = 0; ci < 3; ci++) {
            const moe_config c = router_cfgs(ci);
            const int64_t B = shapes[s][0], T = shapes[s][1], n = B * T, E = c.n_routed_experts, K = c.num_experts_per_tok;
            moe_real *sc = HR(n * E), *fo[2], lo[2];
            int32_t *ch = HI(n * K);
            double *rf = HD(B * E), rl = 0, *cnt = HD(B * E);
            int64_t b, t, e, j;
            moe_real *d_s;
            int32_t *d_c;
            SHAPE("B=%lld T=%lld E=%lld K=%lld %s", (long long)B, (long long)T, (long long)E, (long long)K,
                  c.scoring_func == MOE_SCORING_SIGMOID ? "sigmoid" : "softmax");
            router_inputs(&c, n, sc, ch, NULL);
            for (b = 0; b < B; b++) {
                for (t = b * T; t < (b + 1) * T; t++)
                    for (j = 0; j < K; j++) cnt[b * E + ch[t * K + j]] += 1;
                for (e = 0; e < E; e++) {
                    double P = 0;
                    rf[b * E + e] = (double)E / (double)(K * T) * cnt[b * E + e];
                    for (t = b * T; t < (b + 1) * T; t++) {
                        double tot = 0;
                        for (j = 0; j < E; j++) tot += (double)sc[t * E + j];
                        P += (double)sc[t * E + e] / tot;
                    }
                    rl += rf[b * E + e] * P / (double)T;
                }
            }
            d_s = UPR(sc, n * E);
            d_c = UPI(ch, n * K);
            FOR_THREADS(th) {
                moe_real *d_f = UPR(nanr(B * E), B * E);
                CALL(be->balance_loss(ctx, &c, d_s, d_c, B, T, d_f, &lo[th - 1]));
                fo[th - 1] = HR(B * E);
                DOWNR(fo[th - 1], d_f, B * E);
            }
            /* f = E/(K·T)·count: the CPU adds E/(K·T) once per slot, so up to K·T rounded
               additions: K·T/2 + 1 ulps (a backend computing the product is within 1) */
            chk_ulp("f", fo[0], rf, NULL, B * E, (double)(K * T) / 2 + 1);
            /* a sum of B·E positive products, each with a mean of T normalised scores
               (E-length sums): 4·(E + T + B·E + 8)·2^-24 relative */
            chk_norm("host_loss", &lo[0], &rl, 1, 4.0 * (double)(E + T + B * E + 8) * U24);
            same_bits("f", fo[0], fo[1], (size_t)(B * E) * sizeof(moe_real));
            same_bits("host_loss", &lo[0], &lo[1], sizeof(moe_real));
        }
}

static void t_dispatch_plan(void) {
    static const int64_t shapes[][3] = {{1, 1, 4}, {37, 3, 13}, {300, 8, 64}, {5, 2, 7}}; /* n, k, E */
    int s, th;
    for (s = 0; s < 4; s++) {
        const int64_t n = shapes[s][0], k = shapes[s][1], E = shapes[s][2];
        int32_t *ch = HI(n * k), *rr = HI(n * k), *rsl = HI(n * k), *ro[2], *so[2], *d_c;
        int64_t *roff = (int64_t *)hbuf((size_t)(E + 1) * sizeof(int64_t)), *fill = (int64_t *)hbuf((size_t)E * sizeof(int64_t));
        int64_t *oo[2], t, e;
        SHAPE("n=%lld k=%lld E=%lld", (long long)n, (long long)k, (long long)E);
        for (t = 0; t < n * k; t++) { /* experts 1 and E − 1 never chosen: empty ranges */
            do ch[t] = (int32_t)irand(E);
            while (ch[t] == 1 || ch[t] == E - 1);
        }
        /* a stable counting sort of the (token, slot) pairs by expert */
        for (t = 0; t < n * k; t++) roff[ch[t] + 1]++;
        for (e = 0; e < E; e++) roff[e + 1] += roff[e], fill[e] = roff[e];
        for (t = 0; t < n * k; t++) {
            rr[t] = (int32_t)fill[ch[t]]++;
            rsl[rr[t]] = (int32_t)t;
        }
        d_c = UPI(ch, n * k);
        FOR_THREADS(th) {
            int32_t *d_r = (int32_t *)dalloc((size_t)(n * k) * sizeof(int32_t)), *d_sl = (int32_t *)dalloc((size_t)(n * k) * sizeof(int32_t));
            oo[th - 1] = (int64_t *)hbuf((size_t)(E + 1) * sizeof(int64_t));
            CALL(be->dispatch_plan(ctx, d_c, n, k, E, oo[th - 1], d_r, d_sl));
            ro[th - 1] = HI(n * k); so[th - 1] = HI(n * k);
            down(ro[th - 1], d_r, (size_t)(n * k) * sizeof(int32_t));
            down(so[th - 1], d_sl, (size_t)(n * k) * sizeof(int32_t));
            moe_ctx_reset(ctx);
        }
        chk_exact_raw("host_offsets", oo[0], roff, E + 1, sizeof(int64_t));
        chk_exact_i32("row_of", ro[0], rr, n * k);
        chk_exact_i32("slot_of", so[0], rsl, n * k);
        same_bits("host_offsets", oo[0], oo[1], (size_t)(E + 1) * sizeof(int64_t));
        same_bits("row_of", ro[0], ro[1], (size_t)(n * k) * sizeof(int32_t));
        same_bits("slot_of", so[0], so[1], (size_t)(n * k) * sizeof(int32_t));
    }
}

/* rows, d (300·130 > 16384: the parallel loop) */
static const int64_t idx_shapes[][2] = {{1, 5}, {37, 67}, {300, 130}};

static void t_gather_rows(void) {
    int s, th, div;
    for (s = 0; s < 3; s++)
        for (div = 1; div <= 3; div += 2) {
            const int64_t rows = idx_shapes[s][0], d = idx_shapes[s][1], S = rows / 2 + 3;
            moe_real *src = rndr(S * d, -1, 1), *ref = HR(rows * d), *o[2], *d_src = UPR(src, S * d);
            int32_t *idx = HI(rows), *d_idx;
            int64_t r;
            SHAPE("rows=%lld d=%lld src rows=%lld div=%d", (long long)rows, (long long)d, (long long)S, div);
            for (r = 0; r < rows; r++) {
                idx[r] = (int32_t)irand(S * div);
                memcpy(ref + r * d, src + (idx[r] / div) * d, (size_t)d * sizeof(moe_real));
            }
            d_idx = UPI(idx, rows);
            FOR_THREADS(th) {
                moe_real *d_dst = UPR(nanr(rows * d), rows * d);
                CALL(be->gather_rows(ctx, d_src, d_idx, div, rows, d, d_dst));
                o[th - 1] = HR(rows * d);
                DOWNR(o[th - 1], d_dst, rows * d);
            }
            chk_exact_real("dst", o[0], ref, rows * d);
            same_bits("dst", o[0], o[1], (size_t)(rows * d) * sizeof(moe_real));
        }
}

static void t_scatter_add_rows(void) {
    int s, th;
    for (s = 0; s < 3; s++) {
        const int64_t rows = idx_shapes[s][0], d = idx_shapes[s][1], S = rows / 3 + 2; /* many repeats */
        moe_real *src = rndr(rows * d, -1, 1), *dst0 = rndr(S * d, -1, 1), *ref = copyr(dst0, S * d), *o[2];
        moe_real *d_src = UPR(src, rows * d);
        int32_t *idx = HI(rows), *d_idx;
        int64_t r, c;
        SHAPE("rows=%lld d=%lld dst rows=%lld", (long long)rows, (long long)d, (long long)S);
        for (r = 0; r < rows; r++) {
            idx[r] = (int32_t)irand(S);
            for (c = 0; c < d; c++) ref[idx[r] * d + c] += src[r * d + c]; /* r in order, rounded in moe_real */
        }
        d_idx = UPI(idx, rows);
        FOR_THREADS(th) {
            moe_real *d_dst = UPR(dst0, S * d);
            CALL(be->scatter_add_rows(ctx, d_src, d_idx, rows, d, d_dst));
            o[th - 1] = HR(S * d);
            DOWNR(o[th - 1], d_dst, S * d);
        }
        chk_exact_real("dst", o[0], ref, S * d);
        same_bits("dst", o[0], o[1], (size_t)(S * d) * sizeof(moe_real));
    }
}

static void t_combine(void) {
    static const int64_t shapes[][3] = {{1, 1, 5}, {37, 3, 67}, {300, 3, 130}, {5, 8, 130}}; /* n, k, d */
    int s, th, with_g;
    for (s = 0; s < 4; s++)
        for (with_g = 0; with_g < 2; with_g++) {
            const int64_t n = shapes[s][0], k = shapes[s][1], d = shapes[s][2], R = n * k;
            moe_real *src = rndr(R * d, -1, 1), *g = rndr(n * k, 0, 1), *y0 = rndr(n * d, -1, 1), *ref = copyr(y0, n * d), *o[2];
            int32_t *row_of = HI(n * k), *d_r;
            moe_real *d_src = UPR(src, R * d), *d_g = UPR(g, n * k);
            int64_t t, j, c;
            SHAPE("n=%lld k=%lld d=%lld gates=%s", (long long)n, (long long)k, (long long)d, with_g ? "yes" : "NULL");
            for (t = 0; t < n * k; t++) row_of[t] = (int32_t)irand(R);
            for (t = 0; t < n; t++)
                for (j = 0; j < k; j++)
                    for (c = 0; c < d; c++) { /* y += g·src, j in order: a rounded product, a rounded sum */
                        moe_real p = with_g ? g[t * k + j] * src[row_of[t * k + j] * d + c] : src[row_of[t * k + j] * d + c];
                        ref[t * d + c] += p;
                    }
            d_r = UPI(row_of, n * k);
            FOR_THREADS(th) {
                moe_real *d_y = UPR(y0, n * d);
                CALL(be->combine(ctx, d_src, d_r, with_g ? d_g : NULL, n, k, d, d_y));
                o[th - 1] = HR(n * d);
                DOWNR(o[th - 1], d_y, n * d);
            }
            chk_exact_real("y", o[0], ref, n * d);
            same_bits("y", o[0], o[1], (size_t)(n * d) * sizeof(moe_real));
        }
}

static void t_expert_gate_bwd(void) {
    int s, th;
    for (s = 0; s < 3; s++) {
        const int64_t rows = idx_shapes[s][0], cols = idx_shapes[s][1];
        moe_real *gate = rndr(rows, 0, 1), *da = rndr(rows * cols, -1, 1), *a = rndr(rows * cols, -1, 1);
        moe_real *rda = HR(rows * cols), *ra = HR(rows * cols), *oa[2], *od[2], *og[2], *d_g = UPR(gate, rows);
        double *rg = HD(rows), *mg = HD(rows);
        int64_t r, c;
        SHAPE("rows=%lld cols=%lld", (long long)rows, (long long)cols);
        for (r = 0; r < rows; r++) {
            for (c = 0; c < cols; c++) {
                rg[r] += (double)da[r * cols + c] * (double)a[r * cols + c];
                mg[r] += fabs((double)da[r * cols + c] * (double)a[r * cols + c]);
                rda[r * cols + c] = da[r * cols + c] * gate[r]; /* one rounded product */
                ra[r * cols + c] = a[r * cols + c] * gate[r];
            }
        }
        FOR_THREADS(th) {
            moe_real *d_da = UPR(da, rows * cols), *d_a = UPR(a, rows * cols), *d_dg = UPR(nanr(rows), rows);
            CALL(be->expert_gate_bwd(ctx, d_g, rows, cols, d_da, d_a, d_dg));
            og[th - 1] = HR(rows); od[th - 1] = HR(rows * cols); oa[th - 1] = HR(rows * cols);
            DOWNR(og[th - 1], d_dg, rows);
            DOWNR(od[th - 1], d_da, rows * cols);
            DOWNR(oa[th - 1], d_a, rows * cols);
        }
        /* dgate: a cols-length dot, 4·(cols + 2)·2^-24 of Σ|dact·act|; the scaling: exact */
        chk_norm("dgate", og[0], rg, rows, 4.0 * (double)(cols + 2) * U24 * cond(mg, rg, rows));
        chk_exact_real("dact", od[0], rda, rows * cols);
        chk_exact_real("act", oa[0], ra, rows * cols);
        same_bits("dgate", og[0], og[1], (size_t)rows * sizeof(moe_real));
        same_bits("dact", od[0], od[1], (size_t)(rows * cols) * sizeof(moe_real));
        same_bits("act", oa[0], oa[1], (size_t)(rows * cols) * sizeof(moe_real));
    }
}

/* ============================================================================================
   FP8, conversions
   ============================================================================================ */

/* values over a wide range (2^-20 .. 2^12), a zero group's worth of zeros at the start */
static moe_real *wide_values(int64_t n, int64_t zeros) {
    moe_real *x = HR(n);
    int64_t i;
    for (i = 0; i < n; i++) x[i] = i < zeros ? 0 : (moe_real)((urand() < 0.5 ? -1 : 1) * ldexp(1 + urand(), (int)(urand() * 12) - (i % 7 == 0 ? 20 : 4)));
    return x;
}

static void t_fp8_quantize(void) {
    /* rows, cols, gr, gc: tiles along rows, down columns, blocks, per tensor; 520 rows of 130
       in 1×32 tiles: 520·130/4 > 16384, the parallel loop */
    static const int64_t shapes[][4] = {{1, 5, 1, 4}, {37, 67, 1, 16}, {37, 67, 16, 1}, {37, 67, 16, 16}, {37, 67, 37, 67}, {520, 130, 1, 32}};
    int s, th, pow2, v;
    for (s = 0; s < 6; s++)
        for (pow2 = 0; pow2 < 2; pow2++)
            for (v = 0; v < 3; v++) { /* codes and deq; codes NULL; deq NULL */
                const int64_t rows = shapes[s][0], cols = shapes[s][1], gr = shapes[s][2], gc = shapes[s][3];
                const int64_t ns = ((rows + gr - 1) / gr) * ((cols + gc - 1) / gc), n = rows * cols;
                moe_real *x = wide_values(n, gr * cols > 16 && s != 4 ? gr * (cols < gc ? cols : gc) : 0), *rq = HR(n), *qo[2];
                uint8_t *rc = HB(n), *co[2];
                float *rs = HF(ns), *so[2];
                moe_real *d_x = UPR(x, n);
                SHAPE("rows=%lld cols=%lld groups %lldx%lld pow2=%d codes=%s deq=%s", (long long)rows, (long long)cols, (long long)gr,
                      (long long)gc, pow2, v == 1 ? "NULL" : "yes", v == 2 ? "NULL" : "yes");
                ref_quant(x, cols, rows, cols, gr, gc, pow2, rc, rs, rq);
                FOR_THREADS(th) {
                    uint8_t *d_c = v == 1 ? NULL : (uint8_t *)dalloc((size_t)n);
                    float *d_s = (float *)dalloc((size_t)ns * sizeof(float));
                    moe_real *d_q = v == 2 ? NULL : UPR(nanr(n), n);
                    CALL(be->fp8_quantize(ctx, d_x, rows, cols, gr, gc, pow2, d_c, d_s, d_q));
                    co[th - 1] = HB(n); so[th - 1] = HF(ns); qo[th - 1] = HR(n);
                    if (d_c) down(co[th - 1], d_c, (size_t)n);
                    down(so[th - 1], d_s, (size_t)ns * sizeof(float));
                    if (d_q) DOWNR(qo[th - 1], d_q, n);
                }
                chk_exact_raw("scales", so[0], rs, ns, sizeof(float));
                if (v != 1) chk_exact_raw("codes", co[0], rc, n, 1);
                if (v != 2) chk_exact_real("deq", qo[0], rq, n);
                same_bits("codes", co[0], co[1], (size_t)n);
                same_bits("scales", so[0], so[1], (size_t)ns * sizeof(float));
                same_bits("deq", qo[0], qo[1], (size_t)n * sizeof(moe_real));
            }
}

static void t_fp8_dequantize(void) {
    static const int64_t shapes[][4] = {{1, 5, 1, 4}, {37, 67, 1, 16}, {37, 67, 16, 1}, {37, 67, 16, 16}, {520, 130, 1, 32}};
    int s, th;
    for (s = 0; s < 5; s++) {
        const int64_t rows = shapes[s][0], cols = shapes[s][1], gr = shapes[s][2], gc = shapes[s][3];
        const int64_t ngc = (cols + gc - 1) / gc, ns = ((rows + gr - 1) / gr) * ngc, n = rows * cols;
        uint8_t *codes = HB(n), *d_c;
        float *sc = HF(ns), *d_s;
        moe_real *ref = HR(n), *o[2];
        int64_t i, r, c;
        SHAPE("rows=%lld cols=%lld groups %lldx%lld", (long long)rows, (long long)cols, (long long)gr, (long long)gc);
        for (i = 0; i < n; i++) {
            codes[i] = (uint8_t)irand(0x7F); /* finite codes, either sign */
            if (urand() < 0.5) codes[i] |= 0x80;
        }
        for (i = 0; i < ns; i++) sc[i] = (float)ldexp(1 + urand(), (int)(urand() * 20) - 10);
        for (r = 0; r < rows; r++)
            for (c = 0; c < cols; c++) /* code value · scale, rounded to float */
                ref[r * cols + c] = (moe_real)(float)(e4m3_value(codes[r * cols + c]) * (double)sc[(r / gr) * ngc + c / gc]);
        d_c = (uint8_t *)up(codes, (size_t)n);
        d_s = (float *)up(sc, (size_t)ns * sizeof(float));
        FOR_THREADS(th) {
            moe_real *d_x = UPR(nanr(n), n);
            CALL(be->fp8_dequantize(ctx, d_c, d_s, rows, cols, gr, gc, d_x));
            o[th - 1] = HR(n);
            DOWNR(o[th - 1], d_x, n);
        }
        chk_exact_real("x", o[0], ref, n);
        same_bits("x", o[0], o[1], (size_t)n * sizeof(moe_real));
    }
}

/* floats that exercise rounding: exact ties and their neighbours for BF16 and E4M3, the
   edges of both ranges, subnormals, signed zeros, infinities, NaN */
static float *convert_inputs(int64_t n) {
    float *x = HF(n);
    int64_t i;
    for (i = 0; i < n; i++) {
        int kind = (int)(i % 8);
        float v;
        if (kind == 0) { /* a bf16 tie, or one float either side */
            uint32_t u = ((uint32_t)irand(0xFF00) << 16) | 0x8000u;
            v = f32_of_bits(u + (uint32_t)(irand(3) - 1));
        } else if (kind == 1) { /* an e4m3 tie: the midpoint of two neighbouring codes */
            int c = (int)irand(0x7E);
            v = (float)((e4m3_value(c) + e4m3_value(c + 1)) / 2);
            if (urand() < 0.3) v = f32_of_bits(bits_of_f32(v) + (uint32_t)(irand(3) - 1));
        } else if (kind == 2) {
            v = (float)ldexp(1 + urand(), (int)irand(300) - 150); /* tiny to huge, subnormal floats */
        } else if (kind == 3) {
            static const float edge[] = {0.0f, 448.0f, 464.0f, 464.0001f, 480.0f, 1e6f, 3.3895314e38f, 3.4e38f,
                                         1.9531250e-3f, 9.765625e-4f, 9.7656e-4f, 1.0e-45f, 1.17549435e-38f, 240.0f, 3.0e38f};
            v = edge[irand((int64_t)(sizeof edge / sizeof edge[0]))];
        } else if (kind == 4 && i % 64 == 4) {
            v = i % 128 == 4 ? (float)INFINITY : (float)NAN;
        } else {
            v = (float)((urand() - 0.5) * ldexp(1.0, (int)irand(16) - 6));
        }
        x[i] = urand() < 0.5 ? -v : v;
    }
    return x;
}

static void t_convert(void) {
    static const int64_t ns[] = {1, 37, 20011}; /* 20011 > 16384: the parallel loop */
    int s, th, kind;
    for (s = 0; s < 3; s++)
        for (kind = 0; kind < 5; kind++) {
            /* 0: F32→BF16, 1: BF16→F32 (every pattern), 2: F32→E4M3, 3: E4M3→F32 (every code), 4: F32→F32 */
            const moe_dtype st = (kind == 1) ? MOE_BF16 : (kind == 3) ? MOE_FP8_E4M3 : MOE_F32;
            const moe_dtype dt = kind == 0 ? MOE_BF16 : kind == 2 ? MOE_FP8_E4M3 : MOE_F32;
            const int64_t n = kind == 1 ? 65536 : kind == 3 ? 256 : ns[s];
            const size_t ssz = st == MOE_F32 ? sizeof(moe_real) : st == MOE_BF16 ? 2 : 1;
            const size_t dsz = dt == MOE_F32 ? sizeof(moe_real) : dt == MOE_BF16 ? 2 : 1;
            float *xf = convert_inputs(n);
            void *src = hbuf((size_t)n * ssz), *ref = hbuf((size_t)n * dsz), *o[2], *d_src;
            int64_t i, bad = 0, first = -1;
            if ((kind == 1 || kind == 3) && s > 0) continue; /* exhaustive once */
            SHAPE("%s -> %s n=%lld", moe_dtype_name(st), moe_dtype_name(dt), (long long)n);
            for (i = 0; i < n; i++) {
                switch (kind) {
                case 0: ((moe_real *)src)[i] = (moe_real)xf[i]; ((uint16_t *)ref)[i] = ref_bf16(xf[i]); break;
                case 1: ((uint16_t *)src)[i] = (uint16_t)i; ((moe_real *)ref)[i] = (moe_real)bf16_value((uint16_t)i); break;
                case 2: ((moe_real *)src)[i] = (moe_real)xf[i]; ((uint8_t *)ref)[i] = ref_e4m3((double)xf[i]); break;
                case 3: ((uint8_t *)src)[i] = (uint8_t)i; ((moe_real *)ref)[i] = (moe_real)e4m3_value((int)i); break;
                default: ((moe_real *)src)[i] = (moe_real)xf[i]; ((moe_real *)ref)[i] = (moe_real)xf[i]; break;
                }
            }
            d_src = up(src, (size_t)n * ssz);
            FOR_THREADS(th) {
                void *d_dst = dalloc((size_t)n * dsz);
                CALL(be->convert(ctx, d_src, st, n, d_dst, dt));
                o[th - 1] = hbuf((size_t)n * dsz);
                down(o[th - 1], d_dst, (size_t)n * dsz);
            }
            for (i = 0; i < n; i++) { /* bits, any NaN for a NaN */
                int ok;
                if (dt == MOE_BF16) ok = bf16_same(((uint16_t *)o[0])[i], ((uint16_t *)ref)[i]);
                else if (dt == MOE_FP8_E4M3) ok = ((uint8_t *)o[0])[i] == ((uint8_t *)ref)[i] || ((((uint8_t *)o[0])[i] & 0x7F) == 0x7F && (((uint8_t *)ref)[i] & 0x7F) == 0x7F);
                else ok = real_same(((moe_real *)o[0])[i], ((moe_real *)ref)[i]);
                if (!ok && first < 0) first = i;
                bad += !ok;
            }
            note_err("dst", BITEXACT, (double)bad, 0);
            T_CHECK(bad == 0, "%s: %lld of %lld differ, first at %lld (input %.9g)", shape, (long long)bad, (long long)n, (long long)first,
                    first >= 0 ? (double)xf[first] : 0.0);
            same_bits("dst", o[0], o[1], (size_t)n * dsz);
        }
}

/* ============================================================================================
   element-wise
   ============================================================================================ */

static const int64_t ew_sizes[] = {1, 37, 20011}; /* 20011 values > 16384: the parallel loop */

static void t_copy2d(void) {
    static const int64_t shapes[][4] = {{1, 5, 5, 5}, {37, 67, 70, 67}, {300, 130, 131, 133}}; /* rows, cols, lds, ldd */
    int s, th, acc;
    for (s = 0; s < 3; s++)
        for (acc = 0; acc < 2; acc++) {
            const int64_t rows = shapes[s][0], cols = shapes[s][1], lds = shapes[s][2], ldd = shapes[s][3];
            moe_real *src = rndr(rows * lds, -1, 1), *dst0 = rndr(rows * ldd, -1, 1), *ref = copyr(dst0, rows * ldd), *o[2];
            moe_real *d_src = UPR(src, rows * lds);
            int64_t r, c;
            SHAPE("rows=%lld cols=%lld lds=%lld ldd=%lld accumulate=%d", (long long)rows, (long long)cols, (long long)lds, (long long)ldd, acc);
            for (r = 0; r < rows; r++)
                for (c = 0; c < cols; c++) ref[r * ldd + c] = acc ? ref[r * ldd + c] + src[r * lds + c] : src[r * lds + c];
            FOR_THREADS(th) {
                moe_real *d_dst = UPR(dst0, rows * ldd);
                CALL(be->copy2d(ctx, d_src, lds, rows, cols, d_dst, ldd, acc));
                o[th - 1] = HR(rows * ldd);
                DOWNR(o[th - 1], d_dst, rows * ldd);
            }
            chk_exact_real("dst", o[0], ref, rows * ldd);
            same_bits("dst", o[0], o[1], (size_t)(rows * ldd) * sizeof(moe_real));
        }
}

static void t_add(void) {
    int s, th, rep;
    for (s = 0; s < 3; s++)
        for (rep = 0; rep < 2; rep++) {
            const int64_t nb = rep ? (s == 0 ? 1 : s == 1 ? 37 : 67) : ew_sizes[s], n = rep ? nb * (s == 2 ? 307 : 3) : nb;
            moe_real *a = rndr(n, -1, 1), *b = rndr(nb, -1, 1), *ref = HR(n), *o[2], *d_a = UPR(a, n), *d_b = UPR(b, nb);
            int64_t i;
            SHAPE("n=%lld nb=%lld", (long long)n, (long long)nb);
            for (i = 0; i < n; i++) ref[i] = a[i] + b[i % nb];
            FOR_THREADS(th) {
                moe_real *d_y = UPR(nanr(n), n);
                CALL(be->add(ctx, d_a, d_b, n, nb, d_y));
                o[th - 1] = HR(n);
                DOWNR(o[th - 1], d_y, n);
            }
            chk_exact_real("y", o[0], ref, n);
            same_bits("y", o[0], o[1], (size_t)n * sizeof(moe_real));
        }
}

static void t_mul(void) {
    int s, th, acc;
    for (s = 0; s < 3; s++)
        for (acc = 0; acc < 2; acc++) {
            const int64_t n = ew_sizes[s];
            moe_real *a = rndr(n, -1, 1), *b = rndr(n, -1, 1), *y0 = acc ? rndr(n, -1, 1) : nanr(n), *ref = HR(n), *o[2];
            moe_real *d_a = UPR(a, n), *d_b = UPR(b, n);
            int64_t i;
            SHAPE("n=%lld accumulate=%d", (long long)n, acc);
            for (i = 0; i < n; i++) {
                moe_real p = a[i] * b[i]; /* rounded, then added (no fused multiply-add) */
                ref[i] = acc ? y0[i] + p : p;
            }
            FOR_THREADS(th) {
                moe_real *d_y = UPR(y0, n);
                CALL(be->mul(ctx, d_a, d_b, n, d_y, acc));
                o[th - 1] = HR(n);
                DOWNR(o[th - 1], d_y, n);
            }
            chk_exact_real("y", o[0], ref, n);
            same_bits("y", o[0], o[1], (size_t)n * sizeof(moe_real));
        }
}

static void t_scale(void) {
    int s, th;
    for (s = 0; s < 3; s++) {
        const int64_t n = ew_sizes[s];
        const moe_real alpha = (moe_real)-0.7321;
        moe_real *x = rndr(n, -1, 1), *ref = HR(n), *o[2], *d_x = UPR(x, n);
        int64_t i;
        SHAPE("n=%lld", (long long)n);
        for (i = 0; i < n; i++) ref[i] = alpha * x[i];
        FOR_THREADS(th) {
            moe_real *d_y = UPR(nanr(n), n);
            CALL(be->scale(ctx, alpha, d_x, n, d_y));
            o[th - 1] = HR(n);
            DOWNR(o[th - 1], d_y, n);
        }
        chk_exact_real("y", o[0], ref, n);
        same_bits("y", o[0], o[1], (size_t)n * sizeof(moe_real));
    }
}

static void t_axpy(void) {
    int s, th;
    for (s = 0; s < 3; s++) {
        const int64_t n = ew_sizes[s];
        const moe_real alpha = (moe_real)1.3717;
        moe_real *x = rndr(n, -1, 1), *y0 = rndr(n, -1, 1), *ref = HR(n), *o[2], *d_x = UPR(x, n);
        int64_t i;
        SHAPE("n=%lld", (long long)n);
        for (i = 0; i < n; i++) {
            moe_real p = alpha * x[i]; /* rounded, then added */
            ref[i] = y0[i] + p;
        }
        FOR_THREADS(th) {
            moe_real *d_y = UPR(y0, n);
            CALL(be->axpy(ctx, alpha, d_x, n, d_y));
            o[th - 1] = HR(n);
            DOWNR(o[th - 1], d_y, n);
        }
        chk_exact_real("y", o[0], ref, n);
        same_bits("y", o[0], o[1], (size_t)n * sizeof(moe_real));
    }
}

static void t_fill(void) {
    int s, th;
    for (s = 0; s < 3; s++) {
        const int64_t n = ew_sizes[s];
        const moe_real value = (moe_real)-3.25e-7;
        moe_real *ref = HR(n + 2), *o[2], *init = nanr(n + 2);
        int64_t i;
        SHAPE("n=%lld", (long long)n);
        ref[0] = ref[n + 1] = (moe_real)NAN; /* the neighbours stay */
        for (i = 1; i <= n; i++) ref[i] = value;
        FOR_THREADS(th) {
            moe_real *d_x = UPR(init, n + 2);
            CALL(be->fill(ctx, value, n, d_x + 1));
            o[th - 1] = HR(n + 2);
            DOWNR(o[th - 1], d_x, n + 2);
        }
        chk_exact_real("x", o[0], ref, n + 2);
        same_bits("x", o[0], o[1], (size_t)(n + 2) * sizeof(moe_real));
    }
}

static void t_fill_normal(void) {
    int s, th;
    for (s = 0; s < 3; s++) {
        const int64_t n = ew_sizes[s] + 300;
        const uint64_t key = 0x1234567890ABCDEFull + (uint64_t)s, counter = 1000 + 17 * (uint64_t)s;
        const double mean = 0.25, sd = 1.5;
        moe_real *o[2];
        double *ref = HD(n), *mag = HD(n), sum = 0, sq = 0;
        int64_t i;
        SHAPE("n=%lld counter=%llu", (long long)n, (unsigned long long)counter);
        for (i = 0; i < n; i++) {
            /* u1 in (0, 1] and u2 in [0, 1) from the top 53 bits of the counters' hashes (the
               mapping of moe_rng_normal: the contract names only the counters), Box–Muller */
            uint64_t c = counter + 2 * (uint64_t)i;
            double u1 = ((double)(moe_rng_hash(key, c) >> 11) + 1.0) * ldexp(1.0, -53);
            double u2 = (double)(moe_rng_hash(key, c + 1) >> 11) * ldexp(1.0, -53), r = sqrt(-2 * log(u1));
            ref[i] = mean + sd * r * cos(6.283185307179586 * u2);
            mag[i] = fabs(mean) + sd * r; /* cos near its zeros: count against the radius */
        }
        FOR_THREADS(th) {
            moe_real *d_x = UPR(nanr(n), n);
            CALL(be->fill_normal(ctx, key, counter, (moe_real)mean, (moe_real)sd, n, d_x));
            o[th - 1] = HR(n);
            DOWNR(o[th - 1], d_x, n);
        }
        /* double-precision Box–Muller rounded once to float: 1 ulp; 2 for another libm */
        chk_ulp("x", o[0], ref, mag, n, 2);
        for (i = 0; i < n; i++) sum += (double)o[0][i], sq += (double)o[0][i] * (double)o[0][i];
        if (n > 1000) {
            double m = sum / (double)n, sdv = sqrt(sq / (double)n - m * m);
            T_CHECK(fabs(m - mean) < 0.05 && fabs(sdv - sd) < 0.05, "x %s: mean %.4f std %.4f, want %.2f and %.2f", shape, m, sdv, mean, sd);
        }
        same_bits("x", o[0], o[1], (size_t)n * sizeof(moe_real));
    }
}

/* ============================================================================================
   reductions
   ============================================================================================ */

static void t_sum(void) {
    static const int64_t ns[] = {1, 37, 70001};
    int s, th;
    for (s = 0; s < 3; s++) {
        const int64_t n = ns[s];
        moe_real *x = rndr(n, -1, 2), ref = 0, o[2], *d_x = UPR(x, n);
        int64_t i;
        SHAPE("n=%lld", (long long)n);
        for (i = 0; i < n; i++) ref += x[i]; /* in order, in moe_real */
        FOR_THREADS(th) CALL(be->sum(ctx, d_x, n, &o[th - 1]));
        chk_exact_real("host_sum", &o[0], &ref, 1);
        same_bits("host_sum", &o[0], &o[1], sizeof(moe_real));
    }
}

static void t_sumsq(void) {
    static const int64_t ns[] = {1, 37, 70001}, chunks[] = {32768, 1000}; /* 70001: three chunks of 32768 */
    int s, c, th;
    for (s = 0; s < 3; s++)
        for (c = 0; c < 2; c++) {
            const int64_t n = ns[s], chunk = chunks[c], nc = (n + chunk - 1) / chunk;
            moe_real *x = rndr(n, -3, 3), *d_x = UPR(x, n);
            double *o = (double *)calloc((size_t)(2 * nc), sizeof(double)), worst = 0, tol = 0;
            int64_t i, k;
            SHAPE("n=%lld chunk=%lld", (long long)n, (long long)chunk);
            FOR_THREADS(th) CALL(be->sumsq(ctx, d_x, n, chunk, o + (th - 1) * nc));
            for (k = 0; k < nc; k++) {
                /* each part a double sum of at most `chunk` positive terms (squares of floats
                   are exact in double): 4·(len + 2)·2^-53 relative */
                int64_t len = n - k * chunk < chunk ? n - k * chunk : chunk;
                long double acc = 0;
                double e, t = 4.0 * (double)(len + 2) * ldexp(1.0, -53);
                for (i = k * chunk; i < k * chunk + len; i++) acc += (long double)x[i] * (long double)x[i];
                e = fabs(o[k] - (double)acc) / (double)acc;
                if (tol == 0 || e / t > worst / tol) { worst = e; tol = t; } /* the part nearest its bound */
                T_CHECK(e <= t, "part %lld of %s: relative error %.3g > %.3g", (long long)k, shape, e, t);
            }
            note_err("host_parts", NORMREL, worst, tol);
            same_bits("host_parts", o, o + nc, sizeof(double) * (size_t)nc);
            free(o);
        }
}

static void t_colsum(void) {
    static const int64_t shapes[][2] = {{1, 5}, {37, 67}, {300, 130}, {1000, 3}}; /* rows, d */
    int s, th;
    for (s = 0; s < 4; s++) {
        const int64_t rows = shapes[s][0], d = shapes[s][1];
        moe_real *x = rndr(rows * d, -1, 1), *out0 = rndr(d, -1, 1), *o[2], *d_x = UPR(x, rows * d);
        double *ref = HD(d), *mag = HD(d);
        int64_t r, j;
        SHAPE("rows=%lld d=%lld", (long long)rows, (long long)d);
        for (j = 0; j < d; j++) ref[j] = (double)out0[j], mag[j] = fabs((double)out0[j]);
        for (r = 0; r < rows; r++)
            for (j = 0; j < d; j++) ref[j] += (double)x[r * d + j], mag[j] += fabs((double)x[r * d + j]);
        FOR_THREADS(th) {
            moe_real *d_o = UPR(out0, d);
            CALL(be->colsum(ctx, d_x, rows, d, d_o));
            o[th - 1] = HR(d);
            DOWNR(o[th - 1], d_o, d);
            moe_ctx_reset(ctx);
        }
        /* a sum of rows + 1 terms per column: 4·(rows + 2)·2^-24 of Σ|x| */
        chk_norm("out", o[0], ref, d, 4.0 * (double)(rows + 2) * U24 * cond(mag, ref, d));
        same_bits("out", o[0], o[1], (size_t)d * sizeof(moe_real));
    }
}

/* ============================================================================================
   optimizer, distillation
   ============================================================================================ */

static void t_adamw(void) {
    int s, th, bf;
    for (s = 0; s < 2; s++)
        for (bf = 0; bf < 2; bf++) {
            /* segments with gaps between them; the large slab spans three 32768-value slices */
            const int64_t n = s == 0 ? 37 : (quick ? 40000 : 70001);
            moe__adamw_segment seg[3];
            int64_t nseg = s == 0 ? 1 : 3, i, j, gap_bad = 0;
            const size_t msz = bf ? 2 : 4;
            moe__adamw_op op;
            moe_real *p = rndr(n, -1, 1), *g = rndr(n, -2, 2), *po[2], *go[2];
            void *m0 = hbuf((size_t)n * msz), *v0 = hbuf((size_t)n * msz), *mo[2], *vo[2];
            double *rm = HD(n), *rv = HD(n), *rp = HD(n), *mm = HD(n), *mp = HD(n);
            unsigned char *in_seg = HB(n);
            moe_real *gm = HR(n), *gv = HR(n);
            if (s == 0) {
                seg[0].start = 0; seg[0].len = n; seg[0].decay = 0.01f;
            } else {
                seg[0].start = 0; seg[0].len = 100; seg[0].decay = 0.01f;
                seg[1].start = 150; seg[1].len = 32768; seg[1].decay = 0;
                seg[2].start = 34000; seg[2].len = n - 34000 - 5; seg[2].decay = 0.001f;
            }
            memset(&op, 0, sizeof op);
            op.moment_dtype = bf ? MOE_BF16 : MOE_F32;
            op.host_segments = seg; op.n_segments = nseg;
            op.grad_scale = 0.5f; op.beta1 = 0.9f; op.beta2 = 0.95f; op.eps = 1e-8f; op.step = 1e-3f; op.inv_bc2 = 1.7f;
            SHAPE("n=%lld segments=%lld moments=%s", (long long)n, (long long)nseg, bf ? "bf16" : "f32");
            for (i = 0; i < n; i++) {
                float a = (float)(urand() - 0.5) * 0.2f, b = (float)urand() * 0.1f;
                if (bf) ((uint16_t *)m0)[i] = ref_bf16(a), ((uint16_t *)v0)[i] = ref_bf16(b);
                else ((float *)m0)[i] = a, ((float *)v0)[i] = b;
            }
            for (j = 0; j < nseg; j++)
                for (i = seg[j].start; i < seg[j].start + seg[j].len; i++) {
                    double m_0 = bf ? bf16_value(((uint16_t *)m0)[i]) : (double)((float *)m0)[i];
                    double v_0 = bf ? bf16_value(((uint16_t *)v0)[i]) : (double)((float *)v0)[i];
                    double gg = (double)g[i] * op.grad_scale, b1 = op.beta1, b2 = op.beta2;
                    in_seg[i] = (unsigned char)(j + 1);
                    rm[i] = b1 * m_0 + (1 - b1) * gg;
                    mm[i] = fabs(b1 * m_0) + fabs((1 - b1) * gg);
                    rv[i] = b2 * v_0 + (1 - b2) * gg * gg;
                }
            FOR_THREADS(th) {
                moe_real *d_p = UPR(p, n), *d_g = UPR(g, n);
                void *d_m = up(m0, (size_t)n * msz), *d_v = up(v0, (size_t)n * msz);
                op.p = d_p; op.g = d_g; op.m = d_m; op.v = d_v;
                CALL(be->adamw(ctx, &op));
                po[th - 1] = HR(n); go[th - 1] = HR(n); mo[th - 1] = hbuf((size_t)n * msz); vo[th - 1] = hbuf((size_t)n * msz);
                DOWNR(po[th - 1], d_p, n);
                DOWNR(go[th - 1], d_g, n);
                down(mo[th - 1], d_m, (size_t)n * msz);
                down(vo[th - 1], d_v, (size_t)n * msz);
            }
            for (i = 0; i < n; i++) {
                gm[i] = bf ? (moe_real)bf16_value(((uint16_t *)mo[0])[i]) : (moe_real)((float *)mo[0])[i];
                gv[i] = bf ? (moe_real)bf16_value(((uint16_t *)vo[0])[i]) : (moe_real)((float *)vo[0])[i];
                if (!in_seg[i]) { /* the gaps: nothing moves */
                    rm[i] = bf ? bf16_value(((uint16_t *)m0)[i]) : (double)((float *)m0)[i];
                    rv[i] = bf ? bf16_value(((uint16_t *)v0)[i]) : (double)((float *)v0)[i];
                    mm[i] = 0;
                    rp[i] = (double)p[i];
                    mp[i] = 0;
                    gap_bad += !real_same(go[0][i], g[i]) || !real_same(po[0][i], p[i]);
                } else {
                    /* p from the update's m and v (f32 moments: the backend's; bf16: ours,
                       before their rounding to bf16 — the update uses the float values) */
                    double um = bf ? rm[i] : (double)gm[i], uv = bf ? rv[i] : (double)gv[i];
                    double u = op.step * um / (sqrt(uv * op.inv_bc2) + op.eps), dec = seg[in_seg[i] - 1].decay;
                    rp[i] = (double)p[i] - (u + dec * (double)p[i]);
                    mp[i] = fabs((double)p[i]) + fabs(u) + fabs(dec * (double)p[i]);
                    gap_bad += go[0][i] != 0;
                }
            }
            T_CHECK(gap_bad == 0, "%s: %lld gradients not zeroed in a segment or values changed in a gap", shape, (long long)gap_bad);
            note_err("g, gaps", BITEXACT, (double)gap_bad, 0);
            if (bf) {
                /* bf16 moments: the float value rounded to bf16 (8 significant bits: within
                   2^-8 relative, 2^15 float ulps, just above a power of two) plus the float
                   arithmetic's 3 ulps */
                chk_ulp("m", gm, rm, mm, n, 32768 + 3);
                chk_ulp("v", gv, rv, NULL, n, 32768 + 3);
            } else {
                /* g·scale, two products and a sum: 3 ulps of |β1·m| + |(1 − β1)·g| (m), of v */
                chk_ulp("m", gm, rm, mm, n, 3);
                chk_ulp("v", gv, rv, NULL, n, 3);
            }
            /* step·m/(sqrt(v·c) + eps): five roundings of u; then p − (u + decay·p): 4 ulps
               of |p| + |u| + |decay·p| */
            chk_ulp("p", po[0], rp, mp, n, 4);
            same_bits("p", po[0], po[1], (size_t)n * sizeof(moe_real));
            same_bits("m", mo[0], mo[1], (size_t)n * msz);
            same_bits("v", vo[0], vo[1], (size_t)n * msz);
        }
}

/* ---- distillation ---- */

typedef struct distill_case {
    int64_t rows, V, k;
    int reverse, labels;
    double alpha, T;
} distill_case;

static const distill_case distill_cases[] = {
    {3, 67, 0, 0, 1, 0.5, 2},    {37, 130, 0, 1, 1, 0.3, 1.5}, {37, 130, 5, 0, 1, 0.5, 2},
    {37, 130, 5, 1, 0, 0.5, 2},  {3, 67, 67, 0, 1, 0.5, 1},    {3, 67, 67, 1, 1, 0.7, 2},
    {300, 130, 8, 0, 1, 0.5, 2}, /* 300 rows of 130 > 16384: the parallel loop */
};
#define N_DISTILL_CASES 7

static double lse_d(const double *a, int64_t n, const unsigned char *skip) {
    double mx = -INFINITY, s = 0;
    int64_t j;
    for (j = 0; j < n; j++)
        if (!(skip && skip[j])) mx = fmax(mx, a[j]);
    if (mx == -INFINITY) return mx;
    for (j = 0; j < n; j++)
        if (!(skip && skip[j])) s += exp(a[j] - mx);
    return mx + log(s);
}

/* Everything for one case: inputs on the host and the device, and the reference per row. */
typedef struct distill_data {
    moe__distill_op op; /* device pointers */
    moe_real *zs, *zt, *logp, *tail, *d_zs;
    int32_t *ids, *labels;
    double *ce, *kl, *klmag, *cemag; /* per row (0 for rows that do not count) */
    double *grad, *gmag;             /* [rows, V]: α·(softmax − onehot) + (1 − α)·T·dKL/da */
    int64_t count;
} distill_data;

static void distill_setup(const distill_case *dc, distill_data *D) {
    const int64_t rows = dc->rows, V = dc->V, k = dc->k;
    const double T = dc->T, al = dc->alpha;
    double *a = HD(V), *lq = HD(V), *lpf = HD(V), *ltz = HD(V);
    unsigned char *mark = HB(V);
    int64_t r, j, i;
    memset(D, 0, sizeof *D);
    D->zs = rndr(rows * V, -4, 4);
    D->zt = rndr(rows * V, -4, 4);
    D->labels = HI(rows);
    D->ids = HI(rows * (k ? k : 1));
    D->logp = HR(rows * (k ? k : 1));
    D->tail = HR(rows);
    D->ce = HD(rows); D->kl = HD(rows); D->klmag = HD(rows); D->cemag = HD(rows);
    D->grad = HD(rows * V); D->gmag = HD(rows * V);
    for (r = 0; r < rows; r++) {
        D->labels[r] = (r % 5 == 2) ? -1 : (int32_t)irand(V);
        if (k) { /* the teacher's top-k at T from its logits */
            double tl;
            for (j = 0; j < V; j++) ltz[j] = (double)D->zt[r * V + j] / T;
            tl = lse_d(ltz, V, NULL);
            ref_topk(D->zt + r * V, V, k, D->ids + r * k);
            D->tail[r] = 0;
            {
                double tail = 0;
                for (j = 0; j < V; j++) mark[j] = 0;
                for (i = 0; i < k; i++) {
                    mark[D->ids[r * k + i]] = 1;
                    D->logp[r * k + i] = (moe_real)(ltz[D->ids[r * k + i]] - tl);
                }
                for (j = 0; j < V; j++)
                    if (!mark[j]) tail += exp(ltz[j] - tl);
                D->tail[r] = (moe_real)tail;
            }
        }
    }
    for (r = 0; r < rows; r++) {
        const moe_real *x = D->zs + r * V;
        double lseT, kl = 0, klm = 0, P = 0, lqR = 0, lpR = 0, pR = 0;
        int counts = !dc->labels || D->labels[r] != -1;
        if (!counts) continue;
        D->count++;
        for (j = 0; j < V; j++) a[j] = (double)x[j] / T;
        lseT = lse_d(a, V, NULL);
        for (j = 0; j < V; j++) lq[j] = a[j] - lseT;
        if (dc->labels) {
            double *x1 = HD(V), l1;
            for (j = 0; j < V; j++) x1[j] = (double)x[j];
            l1 = lse_d(x1, V, NULL);
            D->ce[r] = l1 - (double)x[D->labels[r]];
            D->cemag[r] = fabs(l1) + fabs((double)x[D->labels[r]]) + (double)(V + 8);
            for (j = 0; j < V; j++) {
                D->grad[r * V + j] += al * (exp(x1[j] - l1) - (j == D->labels[r] ? 1 : 0));
                D->gmag[r * V + j] += al * (exp(x1[j] - l1) * (double)(V + 8) + (j == D->labels[r] ? 1 : 0));
            }
        }
        if (!k) { /* p = softmax(zt/T) over all V */
            double lt;
            for (j = 0; j < V; j++) ltz[j] = (double)D->zt[r * V + j] / T;
            lt = lse_d(ltz, V, NULL);
            for (j = 0; j < V; j++) {
                double lp = ltz[j] - lt, w = dc->reverse ? exp(lq[j]) : exp(lp);
                lpf[j] = lp;
                kl += dc->reverse ? w * (lq[j] - lp) : w * (lp - lq[j]);
                klm += w * (fabs(a[j]) + fabs(lseT) + (double)(V + 8)) * (1 + fabs(lq[j] - lp));
            }
        } else { /* buckets S ∪ {R} */
            for (j = 0; j < V; j++) mark[j] = 0;
            for (i = 0; i < k; i++) mark[D->ids[r * k + i]] = 1;
            for (i = 0; i < k; i++) {
                double lp = (double)D->logp[r * k + i], l = lq[D->ids[r * k + i]], w = dc->reverse ? exp(l) : exp(lp);
                kl += dc->reverse ? w * (l - lp) : w * (lp - l);
                klm += w * (fabs(a[D->ids[r * k + i]]) + fabs(lseT) + (double)(V + 8)) * (1 + fabs(l - lp));
                P += exp(lp);
            }
            pR = (double)D->tail[r];
            P += pR;
            if (k < V) {
                lqR = lse_d(a, V, mark) - lseT;
                lpR = log(fmax(pR, 1e-30));
                if (!dc->reverse && pR > 0) kl += pR * (log(pR) - lqR);
                if (dc->reverse) kl += exp(lqR) * (lqR - lpR);
                klm += (dc->reverse ? exp(lqR) : pR) * (fabs(lseT) + 2 * (double)(V + 8)) * (1 + fabs(lqR - lpR));
            }
        }
        D->kl[r] = kl;
        D->klmag[r] = klm;
        /* (1 − α)·T·dKL/da_j */
        for (j = 0; j < V; j++) {
            double q = exp(lq[j]), dkl, m;
            if (!k) {
                dkl = dc->reverse ? q * (lq[j] - lpf[j] - kl) : q - exp(lpf[j]);
                m = dc->reverse ? q * (fabs(lq[j]) + fabs(lpf[j]) + fabs(kl) + fabs(a[j]) + fabs(lseT) + 1) : q + exp(lpf[j]);
            } else if (mark[j]) {
                double lp = 0;
                for (i = 0; i < k; i++)
                    if (D->ids[r * k + i] == (int32_t)j) lp = (double)D->logp[r * k + i];
                dkl = dc->reverse ? q * (lq[j] - lp - kl) : P * q - exp(lp);
                m = dc->reverse ? q * (fabs(lq[j]) + fabs(lp) + fabs(kl) + fabs(a[j]) + fabs(lseT) + 1) : P * q + exp(lp);
            } else {
                dkl = dc->reverse ? q * (lqR - lpR - kl) : P * q - pR * q / exp(lqR);
                m = dc->reverse ? q * (fabs(lqR) + fabs(lpR) + fabs(kl) + fabs(a[j]) + fabs(lseT) + 1) : P * q + pR * q / exp(lqR);
            }
            D->grad[r * V + j] += (1 - al) * T * dkl;
            D->gmag[r * V + j] += (1 - al) * T * m * (fabs(a[j]) + fabs(lseT) + (double)(V + 8));
        }
    }
    memset(&D->op, 0, sizeof D->op);
    D->op.rows = rows; D->op.V = V; D->op.k = k;
    D->op.zt = k ? NULL : UPR(D->zt, rows * V);
    D->op.ids = k ? UPI(D->ids, rows * k) : NULL;
    D->op.logp = k ? UPR(D->logp, rows * k) : NULL;
    D->op.tail = k ? UPR(D->tail, rows) : NULL;
    D->op.labels = dc->labels ? UPI(D->labels, rows) : NULL;
    D->op.ignore_index = -1;
    D->op.alpha = (moe_real)al;
    D->op.temperature = (moe_real)T;
    D->op.reverse = dc->reverse;
    D->d_zs = UPR(D->zs, rows * V);
}
static void distill_outputs(distill_data *D) { /* fresh per-row outputs (garbage: NaN) */
    const int64_t rows = D->op.rows;
    D->op.lse1 = UPR(nanr(rows), rows);
    D->op.lseT = UPR(nanr(rows), rows);
    D->op.lseX = UPR(nanr(rows), rows);
    D->op.kl = UPR(nanr(rows), rows);
}
static void distill_shape(const distill_case *dc) {
    SHAPE("rows=%lld V=%lld k=%lld %s labels=%s alpha=%g T=%g", (long long)dc->rows, (long long)dc->V, (long long)dc->k,
          dc->reverse ? "reverse" : "forward", dc->labels ? "yes" : "NULL", dc->alpha, dc->T);
}

static void t_distill_fwd(void) {
    int c, th;
    for (c = 0; c < N_DISTILL_CASES; c++) {
        const distill_case *dc = &distill_cases[c];
        distill_data D;
        double ce[2], kl[2], rce = 0, rkl = 0, mce = 0, mkl = 0, tol = 4.0 * U24;
        int64_t cnt[2], r, nc = 0;
        moe_real *ko[2], *gk;
        double *rk, *mk;
        distill_shape(dc);
        distill_setup(dc, &D);
        FOR_THREADS(th) {
            distill_outputs(&D);
            CALL(be->distill_fwd(ctx, &D.op, D.d_zs, &ce[th - 1], &kl[th - 1], &cnt[th - 1]));
            ko[th - 1] = HR(dc->rows);
            DOWNR(ko[th - 1], D.op.kl, dc->rows);
            moe_ctx_reset(ctx);
        }
        gk = HR(dc->rows); rk = HD(dc->rows); mk = HD(dc->rows);
        for (r = 0; r < dc->rows; r++) {
            rce += D.ce[r]; rkl += D.kl[r]; mce += D.cemag[r]; mkl += D.klmag[r];
            if (!dc->labels || D.labels[r] != -1) gk[nc] = ko[0][r], rk[nc] = D.kl[r], mk[nc] = D.klmag[r], nc++;
        }
        /* a log-probability a − lse is within 2^-24·(|a| + |lse|) + (V + 8)·2^-24 (the sum of V
           exponentials) of its value; the KL weighs those errors by p (or q, then also by
           |log q − log p|): 4·2^-24 relative to Σ w·(|a| + |lse| + V + 8)·(1 + |log q − log p|)
           (the tail bucket's log-sum-exp counted twice); CE: 4·2^-24 of |lse| + |x_label| + V + 8 */
        chk_norm("kl (rows that count)", gk, rk, nc, tol * cond(mk, rk, nc));
        {
            moe_real gce = (moe_real)ce[0], gkl = (moe_real)kl[0];
            chk_norm("host_ce", &gce, &rce, 1, tol * (rce != 0 ? mce / fabs(rce) : 1));
            chk_norm("host_kl", &gkl, &rkl, 1, tol * (rkl != 0 ? mkl / fabs(rkl) : 1));
        }
        note_err("host_count", BITEXACT, (double)(cnt[0] != D.count), 0);
        T_CHECK(cnt[0] == D.count, "host_count %s: %lld, want %lld", shape, (long long)cnt[0], (long long)D.count);
        same_bits("kl", ko[0], ko[1], (size_t)dc->rows * sizeof(moe_real));
        same_bits("host_ce", &ce[0], &ce[1], sizeof(double));
        same_bits("host_kl", &kl[0], &kl[1], sizeof(double));
        same_bits("host_count", &cnt[0], &cnt[1], sizeof(int64_t));
    }
}

static void t_distill_bwd(void) {
    int c, th;
    for (c = 0; c < N_DISTILL_CASES; c++) {
        const distill_case *dc = &distill_cases[c];
        const int64_t n = dc->rows * dc->V;
        const moe_real scale = (moe_real)0.37;
        distill_data D;
        moe_real *dz0 = rndr(n, -0.01, 0.01), *o[2];
        double *ref = HD(n), *mag = HD(n), ce, kl;
        int64_t i, cnt;
        distill_shape(dc);
        distill_setup(dc, &D);
        for (i = 0; i < n; i++) {
            ref[i] = (double)dz0[i] + (double)scale * D.grad[i];
            mag[i] = fabs((double)dz0[i]) + fabs((double)scale) * D.gmag[i];
        }
        FOR_THREADS(th) {
            moe_real *d_dz = UPR(dz0, n);
            distill_outputs(&D); /* the backward reads what this backend's forward wrote */
            CALL(be->distill_fwd(ctx, &D.op, D.d_zs, &ce, &kl, &cnt));
            CALL(be->distill_bwd(ctx, &D.op, D.d_zs, scale, d_dz));
            o[th - 1] = HR(n);
            DOWNR(o[th - 1], d_dz, n);
            moe_ctx_reset(ctx);
        }
        /* as distill_fwd: softmax values within (V + 8)·2^-24 relative, log-probabilities within
           2^-24·(|a| + |lse| + V + 8): 4·2^-24 relative to those magnitudes of the terms */
        chk_norm("dzs", o[0], ref, n, 4.0 * U24 * cond(mag, ref, n));
        same_bits("dzs", o[0], o[1], (size_t)n * sizeof(moe_real));
    }
}

static void t_teacher_topk(void) {
    static const int64_t shapes[][3] = {{1, 5, 1}, {37, 67, 5}, {300, 130, 8}, {3, 6, 6}}; /* rows, V, k (300·4·130 > 16384) */
    static const double temps[] = {1, 2, 0.7, 1.5};
    int s, th;
    for (s = 0; s < 4; s++) {
        const int64_t rows = shapes[s][0], V = shapes[s][1], k = shapes[s][2];
        const double T = temps[s];
        moe_real *z = HR(rows * V), *lo[2], *to[2], *d_z;
        int32_t *io[2], *ri = HI(rows * k);
        double *rl = HD(rows * k), *rt = HD(rows), *ml = HD(rows * k), *lp = HD(V);
        unsigned char *mark = HB(V);
        int64_t r, j, i;
        SHAPE("rows=%lld V=%lld k=%lld T=%g", (long long)rows, (long long)V, (long long)k, T);
        for (i = 0; i < rows * V; i++) z[i] = (moe_real)(floor(urand() * 16) / 2 - 4); /* ties */
        for (r = 0; r < rows; r++) {
            double l, tail = 0;
            for (j = 0; j < V; j++) lp[j] = (double)z[r * V + j] / T;
            l = lse_d(lp, V, NULL);
            for (j = 0; j < V; j++) lp[j] -= l;
            ref_topk(z + r * V, V, k, ri + r * k); /* z/T is monotone in z: the same order and ties */
            for (j = 0; j < V; j++) mark[j] = 0;
            for (i = 0; i < k; i++) {
                mark[ri[r * k + i]] = 1;
                rl[r * k + i] = lp[ri[r * k + i]];
                ml[r * k + i] = fmax(fabs(rl[r * k + i]), 1);
            }
            for (j = 0; j < V; j++)
                if (!mark[j]) tail += exp(lp[j]);
            rt[r] = tail;
        }
        d_z = UPR(z, rows * V);
        FOR_THREADS(th) {
            int32_t *d_i = (int32_t *)dalloc((size_t)(rows * k) * sizeof(int32_t));
            moe_real *d_l = UPR(nanr(rows * k), rows * k), *d_t = UPR(nanr(rows), rows);
            CALL(be->teacher_topk(ctx, d_z, rows, V, k, (moe_real)T, d_i, d_l, d_t));
            io[th - 1] = HI(rows * k); lo[th - 1] = HR(rows * k); to[th - 1] = HR(rows);
            down(io[th - 1], d_i, (size_t)(rows * k) * sizeof(int32_t));
            DOWNR(lo[th - 1], d_l, rows * k);
            DOWNR(to[th - 1], d_t, rows);
            moe_ctx_reset(ctx);
        }
        chk_exact_i32("ids", io[0], ri, rows * k);
        /* logp: a log-softmax over V (the contract leaves its precision open; a float lse is
           within (V + 8)/2 ulps of max(|logp|, 1)); tail: summed in double, rounded once: 1 ulp */
        chk_ulp("logp", lo[0], rl, ml, rows * k, (double)(V + 8) / 2);
        if (k < V) chk_ulp("tail", to[0], rt, NULL, rows, 1);
        same_bits("ids", io[0], io[1], (size_t)(rows * k) * sizeof(int32_t));
        same_bits("logp", lo[0], lo[1], (size_t)(rows * k) * sizeof(moe_real));
        same_bits("tail", to[0], to[1], (size_t)rows * sizeof(moe_real));
    }
    { /* a non-finite logit is an error that names it */
        moe_real z[6] = {0, 1, 2, 3, 4, 5};
        moe_real *d_z, *d_l, *d_t;
        int32_t *d_i;
        moe_status st;
        z[4] = (moe_real)INFINITY;
        SHAPE("rows=1 V=6 k=2 with an infinite logit");
        d_z = UPR(z, 6); d_l = UPR(z, 2); d_t = UPR(z, 1);
        d_i = (int32_t *)dalloc(2 * sizeof(int32_t));
        st = be->teacher_topk(ctx, d_z, 1, 6, 2, 1, d_i, d_l, d_t);
        T_CHECK(st != MOE_OK && strstr(moe_ctx_error(ctx), "logit") != NULL, "%s: status %s, message '%s'", shape,
                moe_status_name(st), moe_ctx_error(ctx));
    }
}

/* ============================================================================================
   the table: one row per entry of struct moe_backend
   ============================================================================================ */

typedef struct entry {
    const char *name;
    size_t offset;
    void (*test)(void);
    int cls;
} entry;

#define ROW(name, cls) {#name, offsetof(moe_backend, name), t_##name, cls}
static const entry entries[] = {
    ROW(alloc, BITEXACT),           ROW(free, BITEXACT),           ROW(copy, BITEXACT),
    ROW(memset, BITEXACT),          ROW(scratch, BITEXACT),        ROW(gemm, NORMREL),
    ROW(gemm_grouped, NORMREL),     ROW(rmsnorm_fwd, ULP),         ROW(rmsnorm_bwd, NORMREL),
    ROW(softmax_fwd, ULP),          ROW(softmax_bwd, NORMREL),     ROW(xent_fwd, ULP),
    ROW(xent_bwd, ULP),             ROW(swiglu_fwd, ULP),          ROW(swiglu_bwd, ULP),
    ROW(rope, ULP),                 ROW(topk_fwd, BITEXACT),       ROW(topk_bwd, BITEXACT),
    ROW(attention_fwd, NORMREL),    ROW(attention_bwd, NORMREL),   ROW(attention_decode, NORMREL),
    ROW(mla_split_kv, BITEXACT),    ROW(mla_merge_kv, BITEXACT),   ROW(router_fwd, BITEXACT),
    ROW(router_bwd, NORMREL),       ROW(balance_loss, NORMREL),    ROW(dispatch_plan, BITEXACT),
    ROW(gather_rows, BITEXACT),     ROW(scatter_add_rows, BITEXACT), ROW(combine, BITEXACT),
    ROW(expert_gate_bwd, NORMREL),  ROW(fp8_quantize, BITEXACT),   ROW(fp8_dequantize, BITEXACT),
    ROW(convert, BITEXACT),         ROW(copy2d, BITEXACT),         ROW(add, BITEXACT),
    ROW(mul, BITEXACT),             ROW(scale, BITEXACT),          ROW(axpy, BITEXACT),
    ROW(fill, BITEXACT),            ROW(fill_normal, ULP),         ROW(sum, BITEXACT),
    ROW(sumsq, NORMREL),            ROW(colsum, NORMREL),          ROW(adamw, ULP),
    ROW(distill_fwd, NORMREL),      ROW(distill_bwd, NORMREL),     ROW(teacher_topk, BITEXACT),
};
#define N_ENTRIES ((int)(sizeof entries / sizeof entries[0]))

/* The function pointers start at `alloc`, right after `name` and `device`, and run to the
   end of the struct. */
typedef void (*any_fn)(void);
typedef char check_alloc_is_first_fn[(offsetof(moe_backend, name) == 0 &&
                                      offsetof(moe_backend, device) > offsetof(moe_backend, name) &&
                                      offsetof(moe_backend, alloc) > offsetof(moe_backend, device) &&
                                      offsetof(moe_backend, alloc) - offsetof(moe_backend, device) < sizeof(moe_device) + sizeof(any_fn) &&
                                      (sizeof(moe_backend) - offsetof(moe_backend, alloc)) % sizeof(any_fn) == 0)
                                         ? 1
                                         : -1];

static void table_covers_the_interface(void) {
    const size_t n_fn = (sizeof(moe_backend) - offsetof(moe_backend, alloc)) / sizeof(any_fn);
    size_t slot;
    int i, j;
    (void)sizeof(check_alloc_is_first_fn);
    T_CHECK(n_fn == (size_t)N_ENTRIES, "moe_backend has %zu function pointers, the table %d rows", n_fn, N_ENTRIES);
    for (i = 0; i < N_ENTRIES; i++) {
        int seen = 0;
        for (j = 0; j < N_ENTRIES; j++) seen += entries[j].offset == entries[i].offset;
        T_CHECK(seen == 1, "entry %s: its offset appears %d times", entries[i].name, seen);
        T_CHECK(entries[i].offset >= offsetof(moe_backend, alloc) && (entries[i].offset - offsetof(moe_backend, alloc)) % sizeof(any_fn) == 0,
                "entry %s: offset %zu is not a function pointer slot", entries[i].name, entries[i].offset);
    }
    for (slot = 0; slot < n_fn; slot++) { /* every slot has a row, and the backend fills it */
        size_t off = offsetof(moe_backend, alloc) + slot * sizeof(any_fn);
        any_fn fp;
        int found = 0;
        for (j = 0; j < N_ENTRIES; j++) found |= entries[j].offset == off;
        T_CHECK(found, "moe_backend's function pointer %zu (offset %zu) has no row in the table", slot, off);
        memcpy(&fp, (const char *)be + off, sizeof fp);
        T_CHECK(fp != NULL, "backend %s leaves function pointer %zu (offset %zu) NULL", be->name, slot, off);
    }
    T_NOTE("%zu entries in moe_backend, %d rows; backend '%s'", n_fn, N_ENTRIES, be->name);
}

/* One case per row: the entry's test, then its worst errors per class. */
static const entry *g_entry;
static void run_entry(void) {
    int c;
    memset(g_worst, 0, sizeof g_worst);
    memset(g_ratio, 0, sizeof g_ratio);
    memset(g_used, 0, sizeof g_used);
    g_thread_checks = 0;
    moe_ctx_set_threads(ctx, 1);
    g_entry->test();
    release_all();
    moe_ctx_set_threads(ctx, 1);
    for (c = 0; c < 3; c++) {
        if (!g_used[c]) continue;
        if (c == BITEXACT) T_NOTE("%-8s %s: %g differing values", class_name[c], c == g_entry->cls ? "(class)" : "       ", g_worst[c]);
        else
            T_NOTE("%-8s %s: worst %s %.3g (%.3g of its tolerance)", class_name[c], c == g_entry->cls ? "(class)" : "       ",
                   c == ULP ? "ulps" : "‖a−b‖/‖b‖", g_worst[c], g_ratio[c]);
    }
    if (g_thread_checks) T_NOTE("1 vs 2 threads bit-identical: %ld outputs compared", g_thread_checks);
    else T_NOTE("1 vs 2 threads: not applicable (memory management)");
}

/* The device named by `--device NAME` or MOE_TEST_DEVICE: "cpu", "cuda" or "cuda:N". Returns
   0 for the CPU, 1 for CUDA (index in *index), -1 for anything else. */
static int parse_device(const char *name, int *index) {
    *index = 0;
    if (strcmp(name, "cpu") == 0) return 0;
    if (strcmp(name, "cuda") == 0) return 1;
    if (strncmp(name, "cuda:", 5) == 0 && name[5] >= '0' && name[5] <= '9') {
        char *end = NULL;
        long v = strtol(name + 5, &end, 10);
        if (*end == 0 && v <= 1024) {
            *index = (int)v;
            return 1;
        }
    }
    return -1;
}

/* The suite did not run: say why, and count nothing (build.sh reads the SUITE line). */
static int skip_suite(const char *why) {
    printf("skip: %s\n", why);
    printf("SUITE: 0 passed, 0 failed\n");
    return 0;
}

/* Points ctx and `be` at the device asked for; returns -1 to go on, else main's exit status. */
static int choose_device(int argc, char **argv) {
    const char *env = getenv("MOE_TEST_DEVICE"), *name = NULL;
    int i, explicit_flag = 0, cuda, index;
    t_filter = NULL;
    for (i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--device") == 0) {
            if (i + 1 == argc) {
                fprintf(stderr, "test_backend: --device needs a value (cpu, cuda or cuda:N)\n");
                return 2;
            }
            name = argv[++i];
            explicit_flag = 1;
        } else if (strncmp(argv[i], "--device=", 9) == 0) name = argv[i] + 9, explicit_flag = 1;
        else if (!t_filter) t_filter = argv[i];
        else {
            fprintf(stderr, "test_backend: unexpected argument '%s' (usage: test_backend [--device cpu|cuda[:N]] [FILTER])\n", argv[i]);
            return 2;
        }
    }
    if (!name && env && env[0]) name = env;
    be = moe__cpu_backend();
    if (!name) return -1;
    cuda = parse_device(name, &index);
    if (cuda < 0) {
        fprintf(stderr, "test_backend: unknown device '%s' (cpu, cuda or cuda:N)\n", name);
        return 2;
    }
    if (!cuda) return -1;
#if defined(MOE_CUDA) && defined(__CUDACC__)
    {
        int n = 0;
        moe_status st = moe_cuda_device_count(ctx, &n);
        char why[1024];
        if (st != MOE_OK || n <= index) {
            snprintf(why, sizeof why, "CUDA device %d asked for, %d found (%s)", index, n,
                     st != MOE_OK ? moe_ctx_error(ctx) : n == 0 ? "no GPU or no driver here" : "index out of range");
            if (!explicit_flag) return skip_suite(why);
            fprintf(stderr, "test_backend: --device %s: %s\n", name, why);
            return 2;
        }
        st = moe_ctx_set_device(ctx, MOE_DEVICE_CUDA, index);
        if (st != MOE_OK) { /* a GPU is there but unusable: an error either way */
            fprintf(stderr, "test_backend: moe_ctx_set_device(CUDA, %d): %s (%s)\n", index, moe_status_name(st), moe_ctx_error(ctx));
            return 2;
        }
        be = moe__cuda_backend();
        printf("device: CUDA %d, %s\n", index, moe_cuda_device_name(ctx));
        return -1;
    }
#else
    (void)index;
    if (!explicit_flag) return skip_suite("MOE_TEST_DEVICE asks for CUDA, but this build has no CUDA backend (compile it with nvcc and MOE_CUDA)");
    fprintf(stderr, "test_backend: --device %s: this build has no CUDA backend (compile it with nvcc and MOE_CUDA)\n", name);
    return 2;
#endif
}

int main(int argc, char **argv) {
    int i, rc;
    quick = getenv("MOE_TEST_QUICK") != NULL;
    verbose = getenv("MOE_TEST_VERBOSE") != NULL;
    if (moe_ctx_new(&ctx) != MOE_OK) return 2;
    rc = choose_device(argc, argv); /* sets `be`, the backend under test */
    if (rc >= 0) {
        moe_ctx_free(ctx);
        return rc;
    }
    rng = moe_rng_new(20240601, 7);
    T_RUN(table_covers_the_interface);
    if (sizeof(moe_real) != sizeof(float)) {
        printf("skip: the kernel tests check float arithmetic (moe_real is double under MOE_REAL_F64)\n");
    } else {
        for (i = 0; i < N_ENTRIES; i++) {
            if (t_filter && !strstr(entries[i].name, t_filter)) continue;
            g_entry = &entries[i];
            t__run(entries[i].name, run_entry);
        }
    }
    moe_ctx_free(ctx);
    return t_summary();
}
