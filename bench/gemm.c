/* bench/gemm.c — moe_gemm (FP32 and BF16 compute) against OpenBLAS cblas_sgemm.
   Build: cc -O3 -march=native -ffp-contract=off -fopenmp -I. bench/gemm.c -o build/bench_gemm -lopenblas -lm
   Usage: build/bench_gemm [--quick]
   Timing: each cell (shape, threads) runs a warm-up, then 6 rounds (3 with --quick); a round
   times one batch each of moe FP32, moe BF16 and OpenBLAS (batches of about 40 ms, 12 ms
   with --quick, so ≥ 0.24 s per library and cell). The reported GFLOP/s is the BEST batch
   (the machine is shared and noisy; the best batch is the least disturbed one).
   OpenBLAS's kernel: OpenBLAS (a DYNAMIC_ARCH build, as Debian's) picks a "core" from cpuid
   when it loads, and 0.3.21 does not know every CPU: it calls the project's Intel Xeon (family
   6 model 207, AVX-512) "Prescott" and runs SSE3 kernels there. So the bench compares the
   core OpenBLAS chose with what the CPU's flags support, and where OpenBLAS chose a core of
   a lower instruction set it sets OPENBLAS_CORETYPE and runs itself again (OpenBLAS reads the
   variable only when it loads). See best_core(). OPENBLAS_CORETYPE set by the caller is kept.
   The CPU (model name, vendor/family/model) and the core OpenBLAS ran are printed in the table
   and are the "cpu", "cpu_id", "openblas_core" fields of the JSON line.
   The FP32 FMA peak is measured first (the faster of 256- and 512-bit FMAs: Intel's two-port
   cores double it with 512-bit, Zen 4 does not) and each moe FP32 cell is also a fraction of
   it; fp32_of_peak_1024_rows averages that over the 1024-row shapes and both thread counts.
   moe's FP32 kernel (6×32 zmm with AVX-512, 6×16 ymm otherwise or with MOE_GEMM_ZMM=0) is
   in the table and the JSON ("moe_fp32_kernel"), and so is moe's BF16 one ("moe_bf16_kernel":
   AMX tiles, vdpbf16ps, or the FP32 kernel over bf16-rounded operands where vdpbf16ps is
   slower, see MOE_GEMM_BF16 in moe.h). The last line is one JSON object: fp32_ratio_min / fp32_ratio_geomean are moe FP32 over
   OpenBLAS at 2 threads over all shapes; bf16_over_fp32 is the geometric mean of moe BF16
   over moe FP32 at 2 threads over the shapes with M·N·K ≥ 2^24. */
#define _POSIX_C_SOURCE 200809L
#define MOE_IMPLEMENTATION
#include "moe.h"
#include <cblas.h>
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bench_cpu.h"

#define BF16_KERNEL(ctx)                                                                                        \
    ((ctx)->conf.bf16_kernel == MOE__BF16_AMX  ? "32x32 AMX tiles"                                               \
     : (ctx)->conf.bf16_kernel == MOE__BF16_DP ? "6x32 vdpbf16ps"                                                \
                                               : "fp32 kernel, bf16-rounded operands")

typedef struct { int64_t m, n, k; int ta, tb; const char *role; int quick; } bench_shape;

/* role: fwd = Y = X·Wᵀ (trans_b); dgrad = dY·W (no transposes); wgrad = dYᵀ·X (trans_a). */
static const bench_shape SHAPES[] = {
    {256, 96, 32, 0, 1, "tiny fwd", 1},
    {256, 40, 64, 0, 1, "tiny fwd", 0},
    {256, 128, 64, 0, 1, "tiny fwd", 0},
    {256, 64, 128, 0, 1, "tiny fwd", 1},
    {256, 256, 64, 0, 1, "tiny fwd", 0},
    {1024, 128, 256, 0, 1, "small fwd", 0},
    {1024, 384, 128, 0, 1, "small fwd", 1},
    {1024, 144, 256, 0, 1, "small fwd", 0},
    {1024, 512, 128, 0, 1, "small fwd", 0},
    {1024, 256, 256, 0, 1, "small fwd", 0},
    {1024, 512, 256, 0, 1, "small fwd", 1},
    {1024, 256, 512, 0, 1, "small fwd", 0},
    {1024, 4096, 256, 0, 1, "small fwd (vocab)", 1},
    {128, 128, 256, 0, 1, "small expert fwd", 1},
    {128, 256, 128, 0, 1, "small expert fwd", 0},
    {1024, 256, 512, 0, 0, "small dgrad of 1024x512x256", 1},
    {512, 256, 1024, 1, 0, "small wgrad of 1024x512x256", 1},
    {1024, 1024, 1024, 0, 0, "square NN", 1},
};
#define N_SHAPES ((int)(sizeof SHAPES / sizeof SHAPES[0]))

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

typedef struct {
    const bench_shape *s;
    const float *a, *b;
    float *c;
    moe_ctx *ctx;
    int which; /* 0 moe fp32, 1 moe bf16, 2 blas */
} bench_cell;

static void run_once(const bench_cell *x) {
    const bench_shape *s = x->s;
    int64_t lda = s->ta ? s->m : s->k, ldb = s->tb ? s->k : s->n;
    if (x->which == 2) {
        cblas_sgemm(CblasRowMajor, s->ta ? CblasTrans : CblasNoTrans, s->tb ? CblasTrans : CblasNoTrans,
                    (int)s->m, (int)s->n, (int)s->k, 1.0f, x->a, (int)lda, x->b, (int)ldb, 0.0f, x->c, (int)s->n);
    } else {
        moe_gemm_args g;
        memset(&g, 0, sizeof g);
        g.m = s->m; g.n = s->n; g.k = s->k;
        g.a = x->a; g.a_dtype = MOE_F32; g.lda = lda; g.trans_a = s->ta;
        g.b = x->b; g.b_dtype = MOE_F32; g.ldb = ldb; g.trans_b = s->tb;
        g.c = x->c; g.ldc = s->n; g.alpha = 1.0f; g.beta = 0.0f;
        g.compute = x->which == 1 ? MOE_BF16 : MOE_F32;
        if (moe_gemm(x->ctx, &g) != MOE_OK) {
            fprintf(stderr, "moe_gemm failed: %s\n", moe_ctx_error(x->ctx));
            exit(1);
        }
    }
}

static void sleep_ms(int ms) {
    struct timespec ts;
    ts.tv_sec = ms / 1000;
    ts.tv_nsec = (long)(ms % 1000) * 1000000L;
    nanosleep(&ts, NULL);
}

/* Reps per batch so that one batch lasts about batch_s. */
static int size_batch(const bench_cell *x, double batch_s) {
    double t0, t;
    run_once(x); /* warm-up */
    t0 = now_s();
    run_once(x);
    t = now_s() - t0;
    return t > 0 ? (int)(batch_s / t) + 1 : 1;
}

static double time_batch(const bench_cell *x, int reps) {
    double t0 = now_s();
    int i;
    for (i = 0; i < reps; i++) run_once(x);
    return (now_s() - t0) / reps;
}

/* Best-batch GFLOP/s of moe fp32, moe bf16 and OpenBLAS, measured in interleaved rounds.
   The pauses let idle threads of the other library stop spinning (OpenBLAS workers spin
   for tens of ms after a call, OpenMP workers for about a millisecond), so that neither
   library competes with the other's idle threads for the 2 cores. */
static void time_cells(bench_cell *x, int quick, double *f32, double *bf16, double *blas) {
    double flops = 2.0 * (double)x->s->m * (double)x->s->n * (double)x->s->k;
    double batch_s = quick ? 0.012 : 0.04, best[3] = {1e30, 1e30, 1e30};
    int nb = quick ? 3 : 6, reps[3], b, w;
    for (w = 0; w < 3; w++) {
        x->which = w;
        reps[w] = size_batch(x, batch_s);
        if (w == 1) sleep_ms(10);
    }
    sleep_ms(150);
    for (b = 0; b < nb; b++) {
        for (w = 0; w < 3; w++) {
            double t;
            x->which = w == 2 ? 2 : w;
            if (w == 2) sleep_ms(10);
            t = time_batch(x, reps[w]);
            if (t < best[w]) best[w] = t;
        }
        sleep_ms(150);
    }
    *f32 = flops / best[0] * 1e-9;
    *bf16 = flops / best[1] * 1e-9;
    *blas = flops / best[2] * 1e-9;
}

static double rel_err(const float *x, const float *ref, size_t n) {
    double num = 0, den = 0;
    size_t i;
    for (i = 0; i < n; i++) {
        double e = fabs((double)x[i] - (double)ref[i]);
        if (e > num) num = e;
        if (fabs((double)ref[i]) > den) den = fabs((double)ref[i]);
    }
    return den > 0 ? num / den : num;
}

/* The widest instruction set of an OpenBLAS 0.3.21 core's GEMM kernels: 3 AVX-512, 2 AVX2 +
   FMA, 1 AVX, 0 older (Prescott, Core2, Nehalem, ...: SSE). Zen runs the Haswell kernels. */
static int core_isa(const char *core) {
    static const char *const avx512[] = {"SkylakeX", "Cooperlake", "SapphireRapids"};
    static const char *const avx2[] = {"Haswell", "Zen", "Excavator", "Steamroller"};
    static const char *const avx[] = {"Sandybridge", "Bulldozer", "Piledriver"};
    size_t i;
    for (i = 0; i < sizeof avx512 / sizeof avx512[0]; i++) if (strcmp(core, avx512[i]) == 0) return 3;
    for (i = 0; i < sizeof avx2 / sizeof avx2[0]; i++) if (strcmp(core, avx2[i]) == 0) return 2;
    for (i = 0; i < sizeof avx / sizeof avx[0]; i++) if (strcmp(core, avx[i]) == 0) return 1;
    return 0;
}

/* The core to force, or NULL to keep OpenBLAS's choice `chosen`: OpenBLAS's choice stands
   unless its kernels use a narrower instruction set than the CPU has. Then: AVX-512 (F, BW, DQ,
   VL, what the SkylakeX kernels use) → Cooperlake where AVX512_BF16 is present, else SkylakeX
   (0.3.21's Cooperlake is SkylakeX plus BF16 kernels: the same SGEMM); AVX2 + FMA → Zen on AMD,
   Haswell elsewhere; AVX → Sandybridge. Measured on the AMD EPYC (Zen 4) here: OpenBLAS picks
   Cooperlake by itself, and the forced Zen (AVX2) core runs SGEMM within noise of it (1 thread,
   1024x512x256 to 1024^3: 99-104 GFLOP/s both), so the choice is kept there. */
static const char *best_core(const bench_cpu *c, const char *chosen) {
    int amd = strcmp(c->vendor, "AuthenticAMD") == 0, isa = 0;
    if (bench_cpu_has(c, "avx512f") && bench_cpu_has(c, "avx512bw") && bench_cpu_has(c, "avx512dq") && bench_cpu_has(c, "avx512vl")) isa = 3;
    else if (bench_cpu_has(c, "avx2") && bench_cpu_has(c, "fma")) isa = 2;
    else if (bench_cpu_has(c, "avx")) isa = 1;
    if (core_isa(chosen) >= isa) return NULL;
    switch (isa) {
    case 3: return bench_cpu_has(c, "avx512_bf16") ? "Cooperlake" : "SkylakeX";
    case 2: return amd ? "Zen" : "Haswell";
    default: return "Sandybridge";
    }
}

/* Give OpenBLAS its best kernel: if best_core() wants another core than the one OpenBLAS chose
   when it loaded, set OPENBLAS_CORETYPE and run this program again (OpenBLAS reads the variable
   only at load time). Returns how the core was chosen: "openblas" (its own choice), "bench"
   (forced here; *default_core = what OpenBLAS chose by itself) or "caller" (the variable was
   already set). */
static const char *choose_core(const bench_cpu *cpu, char **argv, char *default_core, size_t n) {
    const char *forced_from = getenv("MOE_BENCH_OPENBLAS_DEFAULT"), *want;
    if (forced_from) { /* the second run, started below */
        snprintf(default_core, n, "%s", forced_from);
        return "bench";
    }
    snprintf(default_core, n, "%s", openblas_get_corename());
    if (getenv("OPENBLAS_CORETYPE")) return "caller";
    want = best_core(cpu, default_core);
    if (!want) return "openblas";
    fprintf(stderr, "bench_gemm: OpenBLAS chose core %s on this CPU (%s); running again with OPENBLAS_CORETYPE=%s\n",
            default_core, cpu->model, want);
    fflush(stderr);
    if (setenv("OPENBLAS_CORETYPE", want, 1) == 0 && setenv("MOE_BENCH_OPENBLAS_DEFAULT", default_core, 1) == 0) {
        execv("/proc/self/exe", argv);
        execvp(argv[0], argv);
    }
    fprintf(stderr, "bench_gemm: could not run again (%s): OpenBLAS keeps core %s\n", strerror(errno), default_core);
    return "openblas";
}

typedef struct { double f32, blas, bf16; } bench_row;

int main(int argc, char **argv) {
    int quick = argc > 1 && strcmp(argv[1], "--quick") == 0;
    bench_row rows[N_SHAPES][2];
    int done[N_SHAPES];
    moe_ctx *ctx = NULL;
    int si, ti;
    double ratio_min = 1e30, ratio_logsum = 0, bf_logsum = 0;
    int ratio_n = 0, bf_n = 0, first = 1, peak_frac_n = 0;
    double peak[3] = {0, 0, 0}, peak_frac_sum = 0;
    uint64_t rng = 0x9E3779B97F4A7C15ull;
    bench_cpu cpu;
    char default_core[64], cpu_json[512], core_esc[128], def_esc[128], cfg_esc[256];
    const char *core, *core_by;

    bench_cpu_read(&cpu);
    core_by = choose_core(&cpu, argv, default_core, sizeof default_core);
    core = openblas_get_corename();
    if (strcmp(core_by, "bench") == 0 && strcmp(core, getenv("OPENBLAS_CORETYPE")) != 0)
        fprintf(stderr, "bench_gemm: OpenBLAS did not take OPENBLAS_CORETYPE=%s (runs %s)\n", getenv("OPENBLAS_CORETYPE"), core);
    if (moe_ctx_new(&ctx) != MOE_OK) { fprintf(stderr, "moe_ctx_new failed\n"); return 1; }
    for (ti = 1; ti <= 2; ti++) { /* the widest FMA at full rate: 512-bit doubles Intel's peak, not Zen 4's */
        double p256 = bench_fma_peak_gflops(ti, 256), p512 = bench_fma_peak_gflops(ti, 512);
        peak[ti] = p512 > p256 ? p512 : p256;
    }
    printf("moe_gemm vs OpenBLAS cblas_sgemm%s — GFLOP/s, best of %d batches\n", quick ? " (quick)" : "", quick ? 3 : 6);
    printf("CPU: %s (%s); FP32 FMA peak (measured, the faster of 256- and 512-bit FMAs) %.1f GFLOP/s on 1 thread, %.1f on 2\n",
           cpu.model, cpu.id, peak[1], peak[2]);
    printf("OpenBLAS: %s; core %s (%s)\n", openblas_get_config(), core,
           strcmp(core_by, "bench") == 0 ? "set by this bench through OPENBLAS_CORETYPE: OpenBLAS alone chose a narrower core"
           : strcmp(core_by, "caller") == 0 ? "OPENBLAS_CORETYPE set by the caller" : "OpenBLAS's own choice, kept: no wider core fits this CPU");
    if (strcmp(core_by, "bench") == 0) printf("          OpenBLAS's own choice on this CPU was %s\n", default_core);
    printf("%-16s %-30s %3s %9s %6s %9s %6s %9s %7s  %s\n", "shape MxNxK", "role", "thr", "moe_fp32", "%peak", "openblas",
           "ratio", "moe_bf16", "bf/fp", "check (max rel err vs OpenBLAS: fp32, bf16)");
    for (si = 0; si < N_SHAPES; si++) {
        const bench_shape *s = &SHAPES[si];
        size_t asz = (size_t)(s->m * s->k), bsz = (size_t)(s->k * s->n), csz = (size_t)(s->m * s->n), i;
        float *a, *b, *c, *cref;
        double e32, e16;
        bench_cell cell;
        done[si] = 0;
        if (quick && !s->quick) continue;
        a = (float *)malloc(asz * sizeof(float));
        b = (float *)malloc(bsz * sizeof(float));
        c = (float *)malloc(csz * sizeof(float));
        cref = (float *)malloc(csz * sizeof(float));
        for (i = 0; i < asz; i++) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; a[i] = (float)((double)(rng >> 11) * 0x1p-53 * 2.0 - 1.0); }
        for (i = 0; i < bsz; i++) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; b[i] = (float)((double)(rng >> 11) * 0x1p-53 * 2.0 - 1.0); }
        cell.s = s; cell.a = a; cell.b = b; cell.ctx = ctx;
        /* correctness check once per shape */
        openblas_set_num_threads(2);
        moe_ctx_set_threads(ctx, 2);
        cell.c = cref; cell.which = 2; run_once(&cell);
        sleep_ms(150); /* let OpenBLAS's idle workers stop spinning */
        cell.c = c; cell.which = 0; run_once(&cell);
        e32 = rel_err(c, cref, csz);
        cell.which = 1; run_once(&cell);
        e16 = rel_err(c, cref, csz);
        for (ti = 0; ti < 2; ti++) {
            int nt = ti + 1;
            bench_row *r = &rows[si][ti];
            char shp[64];
            openblas_set_num_threads(nt);
            moe_ctx_set_threads(ctx, nt);
            cell.c = c;
            time_cells(&cell, quick, &r->f32, &r->bf16, &r->blas);
            snprintf(shp, sizeof shp, "%lldx%lldx%lld", (long long)s->m, (long long)s->n, (long long)s->k);
            printf("%-16s %-30s %3d %9.1f %5.0f%% %9.1f %6.2f %9.1f %7.2f", shp, s->role, nt, r->f32, 100 * r->f32 / peak[nt], r->blas,
                   r->f32 / r->blas, r->bf16, r->bf16 / r->f32);
            if (ti == 0) printf("  %.2e %.2e%s", e32, e16, (e32 > 1e-4 || e16 > 3e-2) ? "  MISMATCH" : "");
            printf("\n");
            fflush(stdout);
        }
        done[si] = 1;
        if (s->m >= 1024) /* the yardstick: the 1024-row shapes, each thread count */
            for (ti = 0; ti < 2; ti++) {
                peak_frac_sum += rows[si][ti].f32 / peak[ti + 1];
                peak_frac_n++;
            }
        {
            double ratio = rows[si][1].f32 / rows[si][1].blas;
            if (ratio < ratio_min) ratio_min = ratio;
            ratio_logsum += log(ratio); ratio_n++;
            if ((double)s->m * (double)s->n * (double)s->k >= 16777216.0) {
                bf_logsum += log(rows[si][1].bf16 / rows[si][1].f32); bf_n++;
            }
        }
        free(a); free(b); free(c); free(cref);
    }
    printf("CPU %s, OpenBLAS core %s. 2 threads: fp32 ratio min %.3f geomean %.3f; bf16/fp32 geomean (M*N*K >= 2^24) %.3f\n", cpu.model, core, ratio_min,
           exp(ratio_logsum / (ratio_n ? ratio_n : 1)), bf_n ? exp(bf_logsum / bf_n) : 0.0);
    printf("moe FP32 (the %s kernel) on the 1024-row shapes: %.0f%% of the FMA peak on average (1 and 2 threads); moe BF16 on %s\n",
           ctx->conf.f32_zmm ? "6x32 zmm" : "6x16 ymm", 100 * peak_frac_sum / (peak_frac_n ? peak_frac_n : 1), BF16_KERNEL(ctx));
    printf("{\"bench\":\"gemm\",%s,\"openblas_core\":\"%s\",\"openblas_core_set_by\":\"%s\",\"openblas_default_core\":",
           bench_cpu_json(&cpu, cpu_json, sizeof cpu_json), bench_json_escape(core, core_esc, sizeof core_esc), core_by);
    if (strcmp(core_by, "caller") == 0) printf("null"); /* not probed: the caller's variable applied at load */
    else printf("\"%s\"", bench_json_escape(default_core, def_esc, sizeof def_esc));
    printf(",\"moe_fp32_kernel\":\"%s\",\"moe_bf16_kernel\":\"%s\"", ctx->conf.f32_zmm ? "6x32 zmm" : "6x16 ymm", BF16_KERNEL(ctx));
    printf(",\"openblas_config\":\"%s\",\"fma_peak_gflops\":{\"1\":%.1f,\"2\":%.1f},\"fp32_ratio_min\":%.4f,"
           "\"fp32_ratio_geomean\":%.4f,\"bf16_over_fp32\":%.4f,\"fp32_of_peak_1024_rows\":%.4f,\"rows\":[",
           bench_json_escape(openblas_get_config(), cfg_esc, sizeof cfg_esc), peak[1], peak[2], ratio_min,
           exp(ratio_logsum / (ratio_n ? ratio_n : 1)), bf_n ? exp(bf_logsum / bf_n) : 0.0,
           peak_frac_sum / (peak_frac_n ? peak_frac_n : 1));
    for (si = 0; si < N_SHAPES; si++) {
        if (!done[si]) continue;
        for (ti = 0; ti < 2; ti++) {
            const bench_shape *s = &SHAPES[si];
            const bench_row *r = &rows[si][ti];
            printf("%s{\"shape\":\"%lldx%lldx%lld\",\"role\":\"%s\",\"threads\":%d,\"moe_fp32_gflops\":%.2f,\"blas_gflops\":%.2f,"
                   "\"ratio\":%.4f,\"moe_bf16_gflops\":%.2f,\"moe_fp32_of_peak\":%.4f}",
                   first ? "" : ",", (long long)s->m, (long long)s->n, (long long)s->k, s->role, ti + 1, r->f32, r->blas,
                   r->f32 / r->blas, r->bf16, r->f32 / peak[ti + 1]);
            first = 0;
        }
    }
    printf("]}\n");
    moe_ctx_free(ctx);
    return 0;
}
