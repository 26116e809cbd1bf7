/* bench/bench_cpu.h — which CPU a bench ran on, for its table and its JSON line, and what
   its FMA units can do (the peak that MFU and GEMM efficiency are taken against).

   Figures from these benches are only comparable on one CPU, and the project's machines
   differ (AMD Zen 4 or Intel Xeon), so every bench names the CPU next to its numbers:
   "cpu" is the "model name" of /proc/cpuinfo, "cpu_id" its vendor, family and model (some
   machines report only "AMD EPYC"). Included by the bench programs after moe.h. */
#ifndef BENCH_CPU_H
#define BENCH_CPU_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct bench_cpu {
    char model[160];   /* "model name", or "unknown" */
    char vendor[32];   /* "vendor_id": GenuineIntel, AuthenticAMD */
    int family, model_id;
    char id[96];       /* "AuthenticAMD family 25 model 17" */
    char flags[4096];  /* the "flags" line, with a space before and after each flag */
} bench_cpu;

/* The value of a "key : value" line of /proc/cpuinfo, trimmed, if the line has that key. */
static inline const char *bench_cpuinfo_value(char *line, const char *key) {
    size_t n = strlen(key), len;
    char *v;
    if (strncmp(line, key, n) != 0 || (line[n] != ' ' && line[n] != '\t' && line[n] != ':')) return NULL;
    v = strchr(line, ':');
    if (!v) return NULL;
    v++;
    while (*v == ' ' || *v == '\t') v++;
    len = strlen(v);
    while (len > 0 && (v[len - 1] == '\n' || v[len - 1] == ' ' || v[len - 1] == '\r')) v[--len] = 0;
    return v;
}

/* Read the first processor's entry of /proc/cpuinfo. */
static inline void bench_cpu_read(bench_cpu *c) {
    static char line[8192];
    FILE *f = fopen("/proc/cpuinfo", "r");
    int got_model = 0;
    memset(c, 0, sizeof *c);
    strcpy(c->model, "unknown");
    strcpy(c->vendor, "unknown");
    c->family = c->model_id = -1;
    while (f && fgets(line, sizeof line, f)) {
        const char *v;
        if (line[0] == '\n' && got_model) break; /* end of the first processor's entry */
        if ((v = bench_cpuinfo_value(line, "model name"))) {
            snprintf(c->model, sizeof c->model, "%s", v);
            got_model = 1;
        } else if ((v = bench_cpuinfo_value(line, "vendor_id"))) {
            snprintf(c->vendor, sizeof c->vendor, "%s", v);
        } else if ((v = bench_cpuinfo_value(line, "cpu family"))) {
            c->family = (int)strtol(v, NULL, 10);
        } else if ((v = bench_cpuinfo_value(line, "model"))) {
            c->model_id = (int)strtol(v, NULL, 10);
        } else if ((v = bench_cpuinfo_value(line, "flags"))) {
            snprintf(c->flags, sizeof c->flags, " %s ", v);
        }
    }
    if (f) fclose(f);
    snprintf(c->id, sizeof c->id, "%s family %d model %d", c->vendor, c->family, c->model_id);
}

/* Does the CPU report this /proc/cpuinfo flag (e.g. "avx512f")? */
static inline int bench_cpu_has(const bench_cpu *c, const char *flag) {
    char pat[64];
    snprintf(pat, sizeof pat, " %s ", flag);
    return strstr(c->flags, pat) != NULL;
}

/* s as the inside of a JSON string (quotes, backslashes and control characters escaped). */
static inline const char *bench_json_escape(const char *s, char *out, size_t n) {
    size_t o = 0;
    for (; *s && o + 7 < n; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\') { out[o++] = '\\'; out[o++] = (char)ch; }
        else if (ch < 0x20) o += (size_t)snprintf(out + o, n - o, "\\u%04x", ch);
        else out[o++] = (char)ch;
    }
    out[o] = 0;
    return out;
}

/* The "cpu" and "cpu_id" members of a JSON object, without braces: "cpu":"…","cpu_id":"…" */
static inline const char *bench_cpu_json(const bench_cpu *c, char *out, size_t n) {
    char a[2 * sizeof c->model], b[2 * sizeof c->id];
    snprintf(out, n, "\"cpu\":\"%s\",\"cpu_id\":\"%s\"", bench_json_escape(c->model, a, sizeof a),
             bench_json_escape(c->id, b, sizeof b));
    return out;
}

/* qsort's order of doubles, for the medians the benches report. */
static inline int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <math.h>

/* The FP32 FMA peak of `threads` threads in GFLOP/s: 12 independent accumulator chains per
   thread, no memory traffic, best of 5. (Needs moe.h's implementation: MOE__OMP, moe_time_s.) */
/* width 512: the same loop with 512-bit FMAs (0 where the build has no AVX-512F). */
static inline double bench_fma_peak_gflops(int threads, int width) {
    const long iters = 40000000;
    double best = 0;
    int rep;
    /* best of 5: a rep whose second thread started late or shared a core reads low (seen once
       as a 2-thread "peak" equal to the 1-thread one) */
    for (rep = 0; rep < 5; rep++) {
        double t0 = moe_time_s(), sink = 0;
        int th;
#ifndef __AVX512F__
        if (width == 512) return 0;
#endif
        MOE__OMP(omp parallel for num_threads(threads) reduction(+:sink))
        for (th = 0; th < threads; th++) {
#ifdef __AVX512F__
            if (width == 512) {
                __m512 a0 = _mm512_set1_ps(1.00f), a1 = _mm512_set1_ps(1.01f), a2 = _mm512_set1_ps(1.02f), a3 = _mm512_set1_ps(1.03f),
                       a4 = _mm512_set1_ps(1.04f), a5 = _mm512_set1_ps(1.05f), a6 = _mm512_set1_ps(1.06f), a7 = _mm512_set1_ps(1.07f),
                       a8 = _mm512_set1_ps(1.08f), a9 = _mm512_set1_ps(1.09f), a10 = _mm512_set1_ps(1.10f),
                       a11 = _mm512_set1_ps(1.11f), m = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-7f);
                long i;
                for (i = 0; i < iters / 16; i++) { /* the same FLOPs as the 256-bit loop in half the iterations */
                    a0 = _mm512_fmadd_ps(a0, m, c); a1 = _mm512_fmadd_ps(a1, m, c); a2 = _mm512_fmadd_ps(a2, m, c);
                    a3 = _mm512_fmadd_ps(a3, m, c); a4 = _mm512_fmadd_ps(a4, m, c); a5 = _mm512_fmadd_ps(a5, m, c);
                    a6 = _mm512_fmadd_ps(a6, m, c); a7 = _mm512_fmadd_ps(a7, m, c); a8 = _mm512_fmadd_ps(a8, m, c);
                    a9 = _mm512_fmadd_ps(a9, m, c); a10 = _mm512_fmadd_ps(a10, m, c); a11 = _mm512_fmadd_ps(a11, m, c);
                }
                a0 = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)),
                                   _mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7)));
                a0 = _mm512_add_ps(a0, _mm512_add_ps(_mm512_add_ps(a8, a9), _mm512_add_ps(a10, a11)));
                sink += _mm512_reduce_add_ps(a0);
                continue;
            }
#endif
#if defined(__AVX2__) && defined(__FMA__)
            /* distinct starting values: identical chains would be merged by the compiler */
            __m256 a0 = _mm256_set1_ps(1.00f), a1 = _mm256_set1_ps(1.01f), a2 = _mm256_set1_ps(1.02f), a3 = _mm256_set1_ps(1.03f),
                   a4 = _mm256_set1_ps(1.04f), a5 = _mm256_set1_ps(1.05f), a6 = _mm256_set1_ps(1.06f), a7 = _mm256_set1_ps(1.07f),
                   a8 = _mm256_set1_ps(1.08f), a9 = _mm256_set1_ps(1.09f), a10 = _mm256_set1_ps(1.10f), a11 = _mm256_set1_ps(1.11f),
                   m = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
            long i;
            float out[8];
            for (i = 0; i < iters / 8; i++) {
                a0 = _mm256_fmadd_ps(a0, m, c); a1 = _mm256_fmadd_ps(a1, m, c); a2 = _mm256_fmadd_ps(a2, m, c);
                a3 = _mm256_fmadd_ps(a3, m, c); a4 = _mm256_fmadd_ps(a4, m, c); a5 = _mm256_fmadd_ps(a5, m, c);
                a6 = _mm256_fmadd_ps(a6, m, c); a7 = _mm256_fmadd_ps(a7, m, c); a8 = _mm256_fmadd_ps(a8, m, c);
                a9 = _mm256_fmadd_ps(a9, m, c); a10 = _mm256_fmadd_ps(a10, m, c); a11 = _mm256_fmadd_ps(a11, m, c);
            }
            a0 = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)), _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)));
            a0 = _mm256_add_ps(a0, _mm256_add_ps(_mm256_add_ps(a8, a9), _mm256_add_ps(a10, a11)));
            _mm256_storeu_ps(out, a0);
            sink += out[0];
#else
            float a[12] = {1.00f, 1.01f, 1.02f, 1.03f, 1.04f, 1.05f, 1.06f, 1.07f, 1.08f, 1.09f, 1.10f, 1.11f};
            long i;
            int j;
            for (i = 0; i < iters / 8; i++)
                for (j = 0; j < 12; j++) a[j] = fmaf(a[j], 0.999999f, 1e-7f);
            sink += a[0];
#endif
        }
        {
            double s = moe_time_s() - t0, gf = (double)threads * (double)(iters / 8) * 12 * 8 * 2 / s / 1e9;
            if (gf > best) best = gf;
            if (sink == 12345.0) printf(" ");
        }
    }
    return best;
}

/* The peak of the BF16 GEMM kernel a context runs (moe.h's MOE__BF16_*), in GFLOP/s on
   `threads` threads, the same way: AMX, four C tiles fed from four loaded tiles (16·16·32·2
   FLOPs per tile instruction); vdpbf16ps, 12 independent zmm chains (64 FLOPs each). 0 for
   FP32 FMAs (products of bf16-rounded values on the FP32 kernel): its peak is the FP32 one,
   which the caller has measured. */
static inline double bench_bf16_peak_gflops(int threads, int kernel) {
    const long iters = 20000000;
    double best = 0;
    int rep;
    if (kernel != MOE__BF16_DP && kernel != MOE__BF16_AMX) return 0;
#if defined(MOE__GEMM_HAVE_AMX)
    if (kernel == MOE__BF16_AMX && !moe__gemm_amx_usable()) return 0; /* also asks Linux for the tiles */
#else
    if (kernel == MOE__BF16_AMX) return 0;
#endif
#if !defined(MOE__GEMM_HAVE_BF16DP)
    return 0;
#endif
    for (rep = 0; rep < 5; rep++) {
        double t0 = moe_time_s(), sink = 0, flops = 0;
        int th;
        MOE__OMP(omp parallel for num_threads(threads) reduction(+:sink))
        for (th = 0; th < threads; th++) {
#if defined(MOE__GEMM_HAVE_AMX)
            if (kernel == MOE__BF16_AMX) {
                static uint16_t ones[16 * 32];
                float out[16 * 16];
                long i;
                int j;
                for (j = 0; j < 16 * 32; j++) ones[j] = 0x3F80; /* 1.0: finite sums */
                moe__gemm_amx_begin();
                _tile_zero(0);
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
                _tile_loadd(4, ones, 64);
                _tile_loadd(5, ones, 64);
                _tile_loadd(6, ones, 64);
                _tile_loadd(7, ones, 64);
                for (i = 0; i < iters / 64; i++) {
                    _tile_dpbf16ps(0, 4, 6);
                    _tile_dpbf16ps(1, 4, 7);
                    _tile_dpbf16ps(2, 5, 6);
                    _tile_dpbf16ps(3, 5, 7);
                }
                _tile_stored(0, out, 64);
                moe__gemm_amx_end();
                sink += out[0];
                continue;
            }
#endif
#if defined(MOE__GEMM_HAVE_BF16DP)
            {
                const __m512bh m = (__m512bh)_mm512_set1_epi32(0x3F803F80); /* (1, 1) pairs */
                __m512 a0 = _mm512_set1_ps(0.0f), a1 = _mm512_set1_ps(1.0f), a2 = _mm512_set1_ps(2.0f), a3 = _mm512_set1_ps(3.0f),
                       a4 = _mm512_set1_ps(4.0f), a5 = _mm512_set1_ps(5.0f), a6 = _mm512_set1_ps(6.0f), a7 = _mm512_set1_ps(7.0f),
                       a8 = _mm512_set1_ps(8.0f), a9 = _mm512_set1_ps(9.0f), a10 = _mm512_set1_ps(10.0f), a11 = _mm512_set1_ps(11.0f);
                long i;
                for (i = 0; i < iters; i++) {
                    a0 = _mm512_dpbf16_ps(a0, m, m); a1 = _mm512_dpbf16_ps(a1, m, m); a2 = _mm512_dpbf16_ps(a2, m, m);
                    a3 = _mm512_dpbf16_ps(a3, m, m); a4 = _mm512_dpbf16_ps(a4, m, m); a5 = _mm512_dpbf16_ps(a5, m, m);
                    a6 = _mm512_dpbf16_ps(a6, m, m); a7 = _mm512_dpbf16_ps(a7, m, m); a8 = _mm512_dpbf16_ps(a8, m, m);
                    a9 = _mm512_dpbf16_ps(a9, m, m); a10 = _mm512_dpbf16_ps(a10, m, m); a11 = _mm512_dpbf16_ps(a11, m, m);
                }
                a0 = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)),
                                   _mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7)));
                a0 = _mm512_add_ps(a0, _mm512_add_ps(_mm512_add_ps(a8, a9), _mm512_add_ps(a10, a11)));
                sink += _mm512_reduce_add_ps(a0);
            }
#endif
        }
        flops = kernel == MOE__BF16_AMX ? (double)threads * (double)(iters / 64) * 4 * 16 * 16 * 32 * 2
                                        : (double)threads * (double)iters * 12 * 64;
        {
            double s = moe_time_s() - t0, gf = flops / s / 1e9;
            if (gf > best) best = gf;
            if (sink == 12345.0) printf(" ");
        }
    }
    return best;
}

#endif
