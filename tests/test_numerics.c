/* tests/test_numerics.c: number-format conversions and FP8 block quantization.

   Every expected value here comes from an oracle written in this file from the
   format definitions (sign, exponent, bias, mantissa) and exact arithmetic in
   double; nothing is compared against the implementation itself or against
   outputs copied from it.  The rounding contract is the one of the CUDA host
   intrinsics (__float2bfloat16_rn, __float2half_rn, __nv_cvt_float_to_fp8 with
   __NV_SATFINITE): round to nearest, ties to even, subnormals kept, signed zeros
   kept, NaN -> canonical code (0x7FFF for bf16/f16, 0x7F for e4m3/e5m2), FP8
   overflow saturates to the largest finite value.

   Build: cc -std=c99 -O2 -Wall -Wextra -Wpedantic -Werror -ffp-contract=off \
             -I. tests/test_numerics.c -o build/test_numerics -lm
   Run:   build/test_numerics [case-name-substring]

   -DNT_QUICK=1 cuts the random counts by 10x; the exhaustive parts (all 256 /
   65536 codes, all midpoints) always run. -DNT_Q_RECIPROCAL=1: see nt_q_input. */
#define MOE_IMPLEMENTATION
#include "moe.h"
#include "test.h"

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* -DNT_QUICK=1 cuts the random counts by 10x. Not needed under sanitizers: the full suite
   takes ~1.3 s at -O2 and ~7 s with -O0 -fsanitize=address,undefined (gcc 12, one core). */
#ifndef NT_QUICK
#  define NT_QUICK 0
#endif

/* random float bit patterns per stream (each FP8 format gets a full-range and an in-range stream) */
#define NT_FP8_RANDOM (NT_QUICK ? 200000L : 2000000L)
#define NT_16_RANDOM  (NT_QUICK ? 100000L : 1000000L)
/* how many individual mismatches a check prints before it only counts them */
#ifndef NT_MAXSHOW
#  define NT_MAXSHOW 4
#endif

#if defined(__FLT16_MAX__) && defined(__GNUC__)
#  define NT_HAVE_FLOAT16 1
__extension__ typedef _Float16 nt_f16_t;
#else
#  define NT_HAVE_FLOAT16 0
#endif

/* ---------------------------------------------------------------- helpers */

static uint32_t nt_fbits(float f) { uint32_t u; memcpy(&u, &f, sizeof u); return u; }
static float nt_bitsf(uint32_t u) { float f; memcpy(&f, &u, sizeof f); return f; }

static uint64_t nt_rng_state = 0x9E3779B97F4A7C15ULL;
static void nt_seed(uint64_t s) { nt_rng_state = s ? s : 0x9E3779B97F4A7C15ULL; }
static uint64_t nt_rng(void) { /* xorshift64 (Marsaglia) */
    uint64_t x = nt_rng_state;
    x ^= x << 13; x ^= x >> 7; x ^= x << 17;
    nt_rng_state = x;
    return x;
}
static uint32_t nt_rand32(void) { return (uint32_t)(nt_rng() >> 32); }
/* uniform in [-1, 1) */
static float nt_urand(void) { return (float)((double)(nt_rng() >> 11) * ldexp(1.0, -52) - 1.0); }
/* float with random sign and mantissa and exponent in [emin, emax] (unbiased) */
static float nt_rand_in_range(int emin, int emax) {
    uint32_t r = nt_rand32();
    uint32_t e = (uint32_t)(127 + emin + (int)(nt_rand32() % (uint32_t)(emax - emin + 1)));
    return nt_bitsf((r & 0x807FFFFFu) | (e << 23));
}

typedef struct { long long n, bad; } nt_tally;

/* exact "a vs midpoint of lo < hi" rounding with ties to the even code; returns lo_code or lo_code+1.
   lo and hi have at most 12 significant bits and a is a float, so the midpoint is exact in
   double and the comparison is exact: comparing a with the midpoint is the same as comparing
   the distances |a-lo| and |hi-a| exactly (subtracting them directly would not always be exact
   in double, e.g. 2^-25 + 2^-149 against 2^-24). */
static unsigned nt_round_between(double a, double lo, double hi, unsigned lo_code) {
    double mid = 0.5 * (lo + hi);
    if (a < mid) return lo_code;
    if (a > mid) return lo_code + 1u;
    return (lo_code & 1u) ? lo_code + 1u : lo_code;
}

/* ------------------------------------------------------------------- FP8 */

typedef struct {
    const char *name;
    int ebits, mbits, bias;
    int ieee_specials;       /* e5m2: exponent all ones = inf/NaN; e4m3fn: only S.1111.111 is NaN */
    unsigned maxcode;        /* largest finite positive code */
    uint8_t (*enc)(float);
    float (*dec)(uint8_t);
    double tab[128];         /* oracle values of the positive codes 0..127 */
} nt_fp8fmt;

static nt_fp8fmt nt_e4m3 = { "e4m3", 4, 3, 7, 0, 0x7Eu, moe_f32_to_e4m3, moe_e4m3_to_f32, { 0 } };
static nt_fp8fmt nt_e5m2 = { "e5m2", 5, 2, 15, 1, 0x7Bu, moe_f32_to_e5m2, moe_e5m2_to_f32, { 0 } };

/* value of a code from the format definition: (-1)^s * 2^(e-bias) * (1 + m/2^M), or for e == 0
   the subnormal (-1)^s * 2^(1-bias) * (m/2^M). */
static double nt_fp8_formula(const nt_fp8fmt *f, unsigned code) {
    unsigned s = code >> 7;
    unsigned e = (code >> f->mbits) & ((1u << f->ebits) - 1u);
    unsigned m = code & ((1u << f->mbits) - 1u);
    double v;
    if (f->ieee_specials && e == (1u << f->ebits) - 1u) v = m ? NAN : INFINITY;
    else if (!f->ieee_specials && (code & 0x7Fu) == 0x7Fu) v = NAN;
    else if (e == 0) v = ldexp(ldexp((double)m, -f->mbits), 1 - f->bias);
    else v = ldexp(1.0 + ldexp((double)m, -f->mbits), (int)e - f->bias);
    return s ? -v : v;
}

static void nt_fp8_init(nt_fp8fmt *f) {
    unsigned c;
    for (c = 0; c < 128; c++) f->tab[c] = nt_fp8_formula(f, c);
}

/* Brute force: nearest finite representable value by exhaustive search over all positive
   finite codes (values increase with the code), ties to the code with even mantissa LSB.
   Values beyond the largest finite one therefore go to it (saturation), and a tie at
   "maxnorm + half ulp" goes to maxnorm for e4m3 (0x7E is even; the next code is NaN) while
   for e5m2 it is handled by the explicit rule below. Then sign, then NaN -> 0x7F. */
static uint8_t nt_fp8_oracle(const nt_fp8fmt *f, float x) {
    double a;
    unsigned best = 0, c;
    if (isnan(x)) return 0x7F;
    a = fabs((double)x);
    for (c = 1; c <= f->maxcode; c++) {
        double mid = 0.5 * (f->tab[best] + f->tab[c]); /* exact: <= 31 significant bits */
        if (a > mid || (a == mid && (c & 1u) == 0)) best = c;
    }
    /* saturation rule of the contract: |x| >= maxnorm + half ulp (e5m2) / > (e4m3) -> maxnorm;
       the search above already gives maxnorm there, this only states the rule explicitly */
    if (a >= f->tab[f->maxcode] + 0.5 * (f->tab[f->maxcode] - f->tab[f->maxcode - 1])) best = f->maxcode;
    return (uint8_t)(best | (signbit(x) ? 0x80u : 0u));
}

static void nt_fp8_check(const nt_fp8fmt *f, float x, nt_tally *t) {
    uint8_t want = nt_fp8_oracle(f, x), got = f->enc(x);
    t->n++;
    if (got != want) {
        if (t->bad < NT_MAXSHOW)
            T_CHECK(got == want, "moe_f32_to_%s(0x%08X = %.9g): expected 0x%02X, got 0x%02X",
                    f->name, (unsigned)nt_fbits(x), (double)x, want, got);
        t->bad++;
    }
}
static void nt_fp8_check_pm(const nt_fp8fmt *f, float x, nt_tally *t) {
    nt_fp8_check(f, x, t);
    nt_fp8_check(f, -x, t);
}
/* x and its neighbours one float ulp away, both signs */
static void nt_fp8_check_nbhd(const nt_fp8fmt *f, float x, nt_tally *t) {
    nt_fp8_check_pm(f, x, t);
    nt_fp8_check_pm(f, nextafterf(x, INFINITY), t);
    nt_fp8_check_pm(f, nextafterf(x, -INFINITY), t);
}

static void nt_fp8_decode_one(nt_fp8fmt *f, long long *nbad) {
    unsigned c;
    for (c = 0; c < 256; c++) {
        double want = nt_fp8_formula(f, c);
        float got = f->dec((uint8_t)c);
        int ok;
        if (isnan(want)) ok = isnan(got);
        else ok = nt_fbits(got) == nt_fbits((float)want); /* exact, sign of zero and infinities included */
        if (!ok) {
            if (*nbad < NT_MAXSHOW)
                T_CHECK(ok, "moe_%s_to_f32(0x%02X): expected %a, got %a (0x%08X)",
                        f->name, c, want, (double)got, (unsigned)nt_fbits(got));
            (*nbad)++;
        }
    }
}

static void test_fp8_decode_all_codes(void) {
    long long bad4 = 0, bad5 = 0;
    nt_fp8_init(&nt_e4m3);
    nt_fp8_init(&nt_e5m2);
    /* the oracle itself against the format facts */
    T_ASSERT(nt_e4m3.tab[0x7E] == 448.0 && nt_e4m3.tab[1] == ldexp(1.0, -9) && nt_e4m3.tab[8] == ldexp(1.0, -6),
             "e4m3 oracle table wrong");
    T_ASSERT(nt_e5m2.tab[0x7B] == 57344.0 && nt_e5m2.tab[1] == ldexp(1.0, -16) && nt_e5m2.tab[4] == ldexp(1.0, -14)
             && isinf(nt_e5m2.tab[0x7C]) && isnan(nt_e5m2.tab[0x7D]), "e5m2 oracle table wrong");
    nt_fp8_decode_one(&nt_e4m3, &bad4);
    nt_fp8_decode_one(&nt_e5m2, &bad5);
    T_CHECK(isnan(moe_e4m3_to_f32(0x7F)) && isnan(moe_e4m3_to_f32(0xFF)), "e4m3 0x7F/0xFF must decode to NaN");
    T_CHECK(moe_e5m2_to_f32(0x7C) == INFINITY && moe_e5m2_to_f32(0xFC) == -INFINITY, "e5m2 0x7C/0xFC must be +-inf");
    T_CHECK(bad4 == 0, "e4m3 decode: %lld of 256 codes wrong", bad4);
    T_CHECK(bad5 == 0, "e5m2 decode: %lld of 256 codes wrong", bad5);
    T_NOTE("512 codes decoded vs formula oracle: %lld e4m3 + %lld e5m2 mismatches", bad4, bad5);
}

static void nt_fp8_encode_format(nt_fp8fmt *f, int rand_emin, int rand_emax, nt_tally *dense, nt_tally *rnd) {
    static const float specials[] = {
        448.0f, 449.0f, 463.99f, 464.0f, 464.0001f, 480.0f, 496.0f, 512.0f, 1e9f, 1e30f, FLT_MAX,
        57344.0f, 57345.0f, 61439.99f, 61440.0f, 61440.01f, 65536.0f, 1.0f, 0.5f, 3.0f, 0.0f, FLT_MIN
    };
    static const uint32_t nans[] = {
        0x7FC00000u, 0xFFC00000u, 0x7F800001u, 0xFF800001u, 0x7FA00000u, 0xFFA00000u,
        0x7FBFFFFFu, 0x7FFFFFFFu, 0xFFFFFFFFu, 0x7FC12345u, 0xFFE54321u
    };
    static const int tiny_exp[] = { -6, -7, -8, -9, -10, -11, -12, -14, -15, -16, -17, -18, -19, -149 };
    unsigned c, i;
    long k;
    /* (a) dense set: every representable value, every midpoint (incl. the one above maxnorm and
       the one between 0 and the smallest subnormal), each with +-1 float ulp, both signs */
    for (c = 0; c <= f->maxcode; c++) nt_fp8_check_nbhd(f, (float)f->tab[c], dense);
    for (c = 0; c < f->maxcode; c++) {
        double mid = 0.5 * (f->tab[c] + f->tab[c + 1]);
        T_ASSERT((double)(float)mid == mid, "%s midpoint %a not a float", f->name, mid);
        nt_fp8_check_nbhd(f, (float)mid, dense);
    }
    {
        double top = f->tab[f->maxcode], step = top - f->tab[f->maxcode - 1];
        nt_fp8_check_nbhd(f, (float)(top + 0.5 * step), dense); /* 464 / 61440 */
        nt_fp8_check_nbhd(f, (float)(top + step), dense);       /* 480 / 65536 */
    }
    for (i = 0; i < sizeof specials / sizeof specials[0]; i++) nt_fp8_check_nbhd(f, specials[i], dense);
    for (i = 0; i < sizeof tiny_exp / sizeof tiny_exp[0]; i++) {
        float t = (float)ldexp(1.0, tiny_exp[i]);
        nt_fp8_check_nbhd(f, t, dense);
        nt_fp8_check_nbhd(f, 1.5f * t, dense);
    }
    nt_fp8_check_nbhd(f, INFINITY, dense); /* nextafterf(inf, +inf) = inf; nextafterf(inf, -inf) = FLT_MAX */
    for (i = 0; i < sizeof nans / sizeof nans[0]; i++) nt_fp8_check(f, nt_bitsf(nans[i]), dense);
    /* (b) random float bit patterns: full range, then exponents near the format's range */
    for (k = 0; k < NT_FP8_RANDOM; k++) nt_fp8_check(f, nt_bitsf(nt_rand32()), rnd);
    for (k = 0; k < NT_FP8_RANDOM; k++) nt_fp8_check(f, nt_rand_in_range(rand_emin, rand_emax), rnd);
}

static void test_fp8_encode(void) {
    nt_tally d4 = { 0, 0 }, r4 = { 0, 0 }, d5 = { 0, 0 }, r5 = { 0, 0 };
    float qnan = nt_bitsf(0x7FC00000u), nqnan = nt_bitsf(0xFFC00000u);
    nt_fp8_init(&nt_e4m3);
    nt_fp8_init(&nt_e5m2);
    nt_seed(0x5EED0008ULL);
    /* the oracle against the contract's explicit rules (guards the oracle, not the header) */
    {
        static const struct { int e5; float x; unsigned want; } rules[] = {
            { 0, 464.0f, 0x7E }, { 0, -464.0f, 0xFE }, { 0, 464.0001f, 0x7E }, { 0, 1e9f, 0x7E },
            { 0, 432.0f, 0x7E }, /* tie 416|448 -> even 0x7E */ { 0, 431.99f, 0x7D }, { 0, -0.0f, 0x80 },
            { 0, 0.0009765625f /* 2^-10 */, 0x00 }, { 0, -0.0009765625f, 0x80 },
            { 0, 0.0029296875f /* 3*2^-10: tie 1|2 */, 0x02 }, { 0, 0.001953125f /* 2^-9 */, 0x01 },
            { 1, 61440.0f, 0x7B }, { 1, 61439.99f, 0x7B }, { 1, -1e9f, 0xFB }, { 1, 57344.0f, 0x7B },
            { 1, 7.62939453125e-06f /* 2^-17 */, 0x00 }, { 1, 1.52587890625e-05f /* 2^-16 */, 0x01 },
            { 1, -0.0f, 0x80 }
        };
        size_t i;
        for (i = 0; i < sizeof rules / sizeof rules[0]; i++) {
            nt_fp8fmt *f = rules[i].e5 ? &nt_e5m2 : &nt_e4m3;
            unsigned got = nt_fp8_oracle(f, rules[i].x);
            T_ASSERT(got == rules[i].want, "ORACLE: %s(%.9g) = 0x%02X, contract says 0x%02X", f->name,
                     (double)rules[i].x, got, rules[i].want);
        }
        T_ASSERT(nt_fp8_oracle(&nt_e4m3, INFINITY) == 0x7E && nt_fp8_oracle(&nt_e4m3, -INFINITY) == 0xFE
                 && nt_fp8_oracle(&nt_e5m2, INFINITY) == 0x7B && nt_fp8_oracle(&nt_e5m2, -INFINITY) == 0xFB
                 && nt_fp8_oracle(&nt_e4m3, nextafterf(0.0009765625f, 1.0f)) == 0x01
                 && nt_fp8_oracle(&nt_e5m2, nextafterf(7.62939453125e-06f, 1.0f)) == 0x01
                 && nt_fp8_oracle(&nt_e4m3, qnan) == 0x7F && nt_fp8_oracle(&nt_e4m3, nqnan) == 0x7F
                 && nt_fp8_oracle(&nt_e5m2, qnan) == 0x7F && nt_fp8_oracle(&nt_e5m2, nqnan) == 0x7F,
                 "ORACLE disagrees with the contract on inf/NaN/underflow");
    }
    nt_fp8_encode_format(&nt_e4m3, -12, 10, &d4, &r4);
    nt_fp8_encode_format(&nt_e5m2, -19, 17, &d5, &r5);
    T_CHECK(d4.bad == 0 && r4.bad == 0, "e4m3 encode: %lld/%lld dense and %lld/%lld random mismatches",
            d4.bad, d4.n, r4.bad, r4.n);
    T_CHECK(d5.bad == 0 && r5.bad == 0, "e5m2 encode: %lld/%lld dense and %lld/%lld random mismatches",
            d5.bad, d5.n, r5.bad, r5.n);
    T_NOTE("e4m3: %lld dense + %lld random floats, %lld mismatches", d4.n, r4.n, d4.bad + r4.bad);
    T_NOTE("e5m2: %lld dense + %lld random floats, %lld mismatches", d5.n, r5.n, d5.bad + r5.bad);
}

/* ------------------------------------------------------------ bf16 / f16 */

typedef struct {
    const char *name;
    unsigned maxfin;           /* largest finite positive code (0x7F7F / 0x7BFF); maxfin+1 is +inf */
    double over;               /* value the IEEE rule rounds toward past maxfin: 2^128 / 2^16 */
    uint16_t (*enc)(float);
    double *tab;               /* oracle values of positive codes 0..maxfin */
} nt_fmt16;

/* nearest code to a >= 0 (not NaN): largest code whose value is <= a by binary search over the
   increasing table, then exact midpoint rounding to it or to the next code; past maxfin the
   "next value" is 2^(emax+1), which is IEEE overflow: a >= maxfin + half ulp -> +inf */
static unsigned nt_near16(const nt_fmt16 *f, double a) {
    unsigned lo = 0, hi = f->maxfin;
    if (a >= f->tab[f->maxfin]) lo = f->maxfin;
    else {
        while (hi - lo > 1) { /* tab[lo] <= a < tab[hi] */
            unsigned mid = lo + (hi - lo) / 2;
            if (f->tab[mid] <= a) lo = mid; else hi = mid;
        }
    }
    if (f->tab[lo] == a) return lo;
    return nt_round_between(a, f->tab[lo], lo == f->maxfin ? f->over : f->tab[lo + 1], lo);
}

static uint16_t nt_oracle16(const nt_fmt16 *f, float x) {
    if (isnan(x)) return 0x7FFF;
    return (uint16_t)(nt_near16(f, fabs((double)x)) | (signbit(x) ? 0x8000u : 0u));
}

#if NT_HAVE_FLOAT16
static uint16_t nt_float16_conv(float x) {
    nt_f16_t h = (nt_f16_t)x;
    uint16_t u;
    memcpy(&u, &h, sizeof u);
    return u;
}
static long long nt_f16_disagree; /* the two f16 oracles disagreeing = bug in this file */
#endif

static void nt_16_check(const nt_fmt16 *f, float x, nt_tally *t) {
    uint16_t want = nt_oracle16(f, x), got = f->enc(x);
#if NT_HAVE_FLOAT16
    if (f->maxfin == 0x7BFFu && !isnan(x) && nt_float16_conv(x) != want) {
        if (nt_f16_disagree < NT_MAXSHOW)
            T_CHECK(0, "ORACLE DISAGREEMENT f16(0x%08X): search 0x%04X, _Float16 0x%04X",
                    (unsigned)nt_fbits(x), want, nt_float16_conv(x));
        nt_f16_disagree++;
    }
#endif
    t->n++;
    if (got != want) {
        if (t->bad < NT_MAXSHOW)
            T_CHECK(got == want, "moe_f32_to_%s(0x%08X = %.9g): expected 0x%04X, got 0x%04X",
                    f->name, (unsigned)nt_fbits(x), (double)x, want, got);
        t->bad++;
    }
}
static void nt_16_check_nbhd(const nt_fmt16 *f, float x, nt_tally *t) {
    float v[3];
    int i;
    v[0] = x; v[1] = nextafterf(x, INFINITY); v[2] = nextafterf(x, -INFINITY);
    for (i = 0; i < 3; i++) { nt_16_check(f, v[i], t); nt_16_check(f, -v[i], t); }
}

/* dense set: every finite value, every midpoint between adjacent values (including the one
   between maxfin and 2^(emax+1), the overflow threshold), each +-1 float ulp, both signs;
   then infinities and NaNs */
static void nt_16_dense(const nt_fmt16 *f, nt_tally *t) {
    static const uint32_t nans[] = { 0x7FC00000u, 0xFFC00000u, 0x7F800001u, 0xFF800001u, 0x7FBFFFFFu,
                                     0x7FFFFFFFu, 0xFFFFFFFFu, 0x7FC12345u, 0xFFE54321u };
    unsigned c, i;
    for (c = 0; c <= f->maxfin; c++) {
        double next = c == f->maxfin ? f->over : f->tab[c + 1];
        double mid = 0.5 * (f->tab[c] + next);
        T_ASSERT((double)(float)f->tab[c] == f->tab[c] && (double)(float)mid == mid,
                 "%s value/midpoint at code 0x%04X not a float", f->name, c);
        nt_16_check_nbhd(f, (float)f->tab[c], t);
        nt_16_check_nbhd(f, (float)mid, t);
    }
    nt_16_check_nbhd(f, INFINITY, t);
    nt_16_check_nbhd(f, FLT_MAX, t);
    nt_16_check_nbhd(f, 1e9f, t);
    for (i = 0; i < sizeof nans / sizeof nans[0]; i++) nt_16_check(f, nt_bitsf(nans[i]), t);
}

static void test_bf16(void) {
    static double tab[0x7F80];
    nt_fmt16 f = { "bf16", 0x7F7Fu, 0, moe_f32_to_bf16, tab };
    nt_tally dec = { 0, 0 }, dense = { 0, 0 }, rnd = { 0, 0 };
    unsigned c;
    long k;
    f.over = ldexp(1.0, 128);
    /* oracle values: a bf16 is the top half of a float, value = float with bits h << 16 */
    for (c = 0; c <= f.maxfin; c++) tab[c] = (double)nt_bitsf((uint32_t)c << 16);
    /* decode: all 65536 codes */
    for (c = 0; c < 65536u; c++) {
        uint32_t wantb = (uint32_t)c << 16;
        float want = nt_bitsf(wantb), got = moe_bf16_to_f32((uint16_t)c);
        int ok = isnan(want) ? isnan(got) : nt_fbits(got) == wantb;
        dec.n++;
        if (!ok) {
            if (dec.bad < NT_MAXSHOW)
                T_CHECK(ok, "moe_bf16_to_f32(0x%04X): expected 0x%08X, got 0x%08X", c, (unsigned)wantb,
                        (unsigned)nt_fbits(got));
            dec.bad++;
        }
    }
    /* oracle sanity vs contract */
    T_ASSERT(nt_oracle16(&f, nt_bitsf(0x3F808000u)) == 0x3F80 && nt_oracle16(&f, nt_bitsf(0x3F818000u)) == 0x3F82
             && nt_oracle16(&f, nt_bitsf(0x7F7F8000u)) == 0x7F80 && nt_oracle16(&f, nt_bitsf(0x7F7F7FFFu)) == 0x7F7F
             && nt_oracle16(&f, -INFINITY) == 0xFF80 && nt_oracle16(&f, nt_bitsf(0xFFC00000u)) == 0x7FFF
             && nt_oracle16(&f, nt_bitsf(0x00008000u)) == 0x0000 && nt_oracle16(&f, nt_bitsf(0x00008001u)) == 0x0001
             && nt_oracle16(&f, -0.0f) == 0x8000,
             "bf16 oracle disagrees with the contract");
    nt_16_dense(&f, &dense);
    nt_seed(0x5EED0B16ULL);
    for (k = 0; k < NT_16_RANDOM; k++) nt_16_check(&f, nt_bitsf(nt_rand32()), &rnd);
    T_CHECK(dec.bad == 0, "bf16 decode: %lld of 65536 codes wrong", dec.bad);
    T_CHECK(dense.bad == 0 && rnd.bad == 0, "bf16 encode: %lld/%lld dense and %lld/%lld random mismatches",
            dense.bad, dense.n, rnd.bad, rnd.n);
    T_NOTE("decode 65536 codes (%lld bad); encode %lld dense + %lld random floats (%lld bad)",
           dec.bad, dense.n, rnd.n, dense.bad + rnd.bad);
}

/* f16 value from the format definition: bias 15, 10 mantissa bits */
static double nt_f16_formula(unsigned h) {
    unsigned e = (h >> 10) & 31u, m = h & 1023u;
    double v;
    if (e == 31) v = m ? NAN : INFINITY;
    else if (e == 0) v = ldexp((double)m, -24);
    else v = ldexp(1024.0 + m, (int)e - 25);
    return (h & 0x8000u) ? -v : v;
}

static void test_f16(void) {
    static double tab[0x7C00];
    nt_fmt16 f = { "f16", 0x7BFFu, 65536.0, moe_f32_to_f16, tab };
    nt_tally dec = { 0, 0 }, dense = { 0, 0 }, rnd = { 0, 0 };
    unsigned c;
    long k;
    for (c = 0; c <= f.maxfin; c++) tab[c] = nt_f16_formula(c);
    for (c = 0; c < 65536u; c++) {
        double want = nt_f16_formula(c);
        float got = moe_f16_to_f32((uint16_t)c);
        int ok = isnan(want) ? isnan(got) : nt_fbits(got) == nt_fbits((float)want);
#if NT_HAVE_FLOAT16
        { /* the formula oracle against the compiler's own f16 -> f32 */
            nt_f16_t h;
            uint16_t u = (uint16_t)c;
            float viac;
            memcpy(&h, &u, sizeof h);
            viac = (float)h;
            T_ASSERT(isnan(want) ? isnan(viac) : nt_fbits(viac) == nt_fbits((float)want),
                     "ORACLE DISAGREEMENT f16 decode 0x%04X", c);
        }
#endif
        dec.n++;
        if (!ok) {
            if (dec.bad < NT_MAXSHOW)
                T_CHECK(ok, "moe_f16_to_f32(0x%04X): expected %a, got %a (0x%08X)", c, want, (double)got,
                        (unsigned)nt_fbits(got));
            dec.bad++;
        }
    }
    T_ASSERT(nt_oracle16(&f, 65519.99f) == 0x7BFF && nt_oracle16(&f, 65520.0f) == 0x7C00
             && nt_oracle16(&f, -65520.0f) == 0xFC00 && nt_oracle16(&f, INFINITY) == 0x7C00
             && nt_oracle16(&f, (float)ldexp(1.0, -25)) == 0x0000
             && nt_oracle16(&f, nextafterf((float)ldexp(1.0, -25), 1.0f)) == 0x0001
             && nt_oracle16(&f, nt_bitsf(0x7F800001u)) == 0x7FFF && nt_oracle16(&f, -0.0f) == 0x8000,
             "f16 oracle disagrees with the contract");
#if NT_HAVE_FLOAT16
    nt_f16_disagree = 0;
#endif
    nt_16_dense(&f, &dense);
    nt_seed(0x5EED0F16ULL);
    for (k = 0; k < NT_16_RANDOM; k++) nt_16_check(&f, nt_bitsf(nt_rand32()), &rnd);
    for (k = 0; k < NT_16_RANDOM; k++) nt_16_check(&f, nt_rand_in_range(-26, 16), &rnd);
    T_CHECK(dec.bad == 0, "f16 decode: %lld of 65536 codes wrong", dec.bad);
    T_CHECK(dense.bad == 0 && rnd.bad == 0, "f16 encode: %lld/%lld dense and %lld/%lld random mismatches",
            dense.bad, dense.n, rnd.bad, rnd.n);
#if NT_HAVE_FLOAT16
    T_CHECK(nt_f16_disagree == 0, "f16 oracles disagree on %lld inputs", nt_f16_disagree);
    T_NOTE("oracles: exact midpoint search and _Float16 cast (agree on all %lld inputs)", dense.n + rnd.n);
#else
    T_NOTE("oracle: exact midpoint search (no _Float16 on this compiler)");
#endif
    T_NOTE("decode 65536 codes (%lld bad); encode %lld dense + %lld random floats (%lld bad)",
           dec.bad, dense.n, rnd.n, dense.bad + rnd.bad);
}

/* ------------------------------------------------------- FP8 quantization */

/* Error bound per element, |x - deq| <= 2^-4 |x| + s 2^-9, where s is the tile's scale,
   y = fl(x/s) (|y| <= 448 (1 + 2^-23) < 464: never saturates), Q = e4m3(y), deq = fl(Q s):
   - normal range (|y| >= 2^-6): 3 mantissa bits, so |Q - y| <= half an ulp = 2^(e-4) for
     2^e <= |y| < 2^(e+1), i.e. <= |y| / 17 (worst at |y| = 2^e (1 + 2^-4)) < 2^-4 |y|;
   - subnormal range (|y| < 2^-6): the step is 2^-9, so |Q - y| <= 2^-10 absolute;
   - the two float roundings (x/s and Q*s) add <= 2^-24 (|x| + |Q s|) ~ 2^-23 |x|, which fits
     in the slack 2^-4 - 1/17 = 2^-4/17 of the normal case and in the second 2^-10 s of the
     subnormal case (there |x|, |Q s| < 2^-6 s (1 + 2^-4)).
   Hence each element is within 2^-4 |x| + s 2^-9 (the max of the two cases is below the sum). */
static double nt_quant_bound(float x, float s) { return ldexp(fabs((double)x), -4) + ldexp((double)s, -9); }

typedef struct {
    long long n, bad_bound, bad_amax, bad_scale, bad_deq, bad_nan, q_exact_miss, scale_inexact;
    double worst_ratio; /* max |x - deq| / bound */
} nt_qstats;

/* The value the quantizer rounds to e4m3. The contract says q = e4m3(x / scale), with float
   division. Build with -DNT_Q_RECIPROCAL=1 if the contract becomes q = e4m3(x * (1/scale)):
   the two differ for some x next to ties (fl(x/s) can land exactly on a tie that the exact
   quotient misses, and fl(x * fl(1/s)) can land on the other side), see test_quant_near_ties. */
#ifndef NT_Q_RECIPROCAL
#  define NT_Q_RECIPROCAL 0
#endif
static float nt_q_input(float x, float s) { return NT_Q_RECIPROCAL ? x * (1.0f / s) : x / s; }

/* scale index of element (r, c) */
static int64_t nt_sidx(int blocks, int64_t r, int64_t c, int64_t cols, int64_t B) {
    int64_t nbc = (cols + B - 1) / B;
    return (blocks ? r / B : r) * nbc + c / B;
}
static int64_t nt_nscales(int blocks, int64_t rows, int64_t cols, int64_t B) {
    return (blocks ? (rows + B - 1) / B : rows) * ((cols + B - 1) / B);
}

/* checks quantized q/s and dequantized d of x against the contract, tile by tile */
static void nt_quant_verify(const char *what, int blocks, const float *x, const uint8_t *q, const float *s,
                            const float *d, int64_t rows, int64_t cols, int64_t B, nt_qstats *st) {
    int64_t ns = nt_nscales(blocks, rows, cols, B), i, r, c;
    float *amax = (float *)calloc((size_t)(ns > 0 ? ns : 1), sizeof *amax);
    nt_fp8_init(&nt_e4m3);
    T_ASSERT(amax != NULL, "out of memory");
    for (r = 0; r < rows; r++)
        for (c = 0; c < cols; c++) {
            float a = fabsf(x[r * cols + c]);
            i = nt_sidx(blocks, r, c, cols, B);
            if (a > amax[i]) amax[i] = a;
        }
    for (i = 0; i < ns; i++) {
        float want = amax[i] > 0.0f ? amax[i] / 448.0f : 1.0f;
        /* contract: s = amax/448 (1 for an all-zero tile); accept 1 float ulp, count exact ones */
        int ok = amax[i] > 0.0f ? fabs((double)s[i] - want) <= ldexp((double)want, -23) : s[i] == 1.0f;
        if (s[i] != want) st->scale_inexact++;
        if (!ok) {
            if (st->bad_scale < NT_MAXSHOW)
                T_CHECK(ok, "%s: scale[%lld] = %.9g, amax %.9g -> expected %.9g", what, (long long)i, (double)s[i],
                        (double)amax[i], (double)want);
            st->bad_scale++;
        }
    }
    for (r = 0; r < rows; r++)
        for (c = 0; c < cols; c++) {
            int64_t e = r * cols + c;
            float sc = s[nt_sidx(blocks, r, c, cols, B)], am = amax[nt_sidx(blocks, r, c, cols, B)];
            double err = fabs((double)x[e] - (double)d[e]), bound = nt_quant_bound(x[e], sc);
            float deq_want = (float)(nt_fp8_formula(&nt_e4m3, q[e]) * (double)sc); /* one rounding = fl(Q*s) */
            st->n++;
            if ((q[e] & 0x7Fu) == 0x7Fu) {
                if (st->bad_nan < NT_MAXSHOW)
                    T_CHECK(0, "%s: q[%lld,%lld] = 0x%02X is NaN (x = %.9g)", what, (long long)r, (long long)c, q[e],
                            (double)x[e]);
                st->bad_nan++;
                continue;
            }
            if (nt_fbits(d[e]) != nt_fbits(deq_want) && !(d[e] == 0.0f && deq_want == 0.0f)) {
                if (st->bad_deq < NT_MAXSHOW)
                    T_CHECK(0, "%s: deq[%lld,%lld] = %.9g, expected e4m3(0x%02X) * %.9g = %.9g", what, (long long)r,
                            (long long)c, (double)d[e], q[e], (double)sc, (double)deq_want);
                st->bad_deq++;
            }
            if (!(err <= bound)) {
                if (st->bad_bound < NT_MAXSHOW)
                    T_CHECK(err <= bound, "%s: x[%lld,%lld] = %.9g, deq %.9g, |err| %.3g > bound %.3g (scale %.9g)",
                            what, (long long)r, (long long)c, (double)x[e], (double)d[e], err, bound, (double)sc);
                st->bad_bound++;
            }
            if (bound > 0.0 && err / bound > st->worst_ratio) st->worst_ratio = err / bound;
            if (am > 0.0f && fabsf(x[e]) == am) {
                float want = x[e] > 0.0f ? 448.0f * sc : -448.0f * sc;
                uint8_t wq = x[e] > 0.0f ? 0x7E : 0xFE;
                if (d[e] != want || q[e] != wq) {
                    if (st->bad_amax < NT_MAXSHOW)
                        T_CHECK(0, "%s: amax element x[%lld,%lld] = %.9g -> q 0x%02X deq %.9g, expected 0x%02X / %.9g",
                                what, (long long)r, (long long)c, (double)x[e], q[e], (double)d[e], wq, (double)want);
                    st->bad_amax++;
                }
            }
            if (q[e] != nt_fp8_oracle(&nt_e4m3, nt_q_input(x[e], sc))) st->q_exact_miss++;
        }
    free(amax);
}

/* x = u * 2^k, u uniform in [-1, 1), k uniform in [-12, 3]: a 2^15 dynamic range inside a tile,
   so the e4m3 subnormal range and underflow to zero are exercised too */
static void nt_fill(float *x, int64_t n) {
    int64_t i;
    for (i = 0; i < n; i++) x[i] = (float)ldexp((double)nt_urand(), (int)(nt_rand32() % 16u) - 12);
}

typedef moe_status (*nt_qfn)(moe_ctx *, const float *, int64_t, int64_t, int64_t, uint8_t *, float *);
typedef moe_status (*nt_dqfn)(moe_ctx *, const uint8_t *, const float *, int64_t, int64_t, int64_t, float *);

/* quantize + dequantize x, verify; returns 0 on an API failure */
static int nt_quant_run(moe_ctx *ctx, const char *what, int blocks, const float *x, int64_t rows, int64_t cols,
                        int64_t B, uint8_t *q, float *s, float *d, nt_qstats *st) {
    nt_qfn qf = blocks ? moe_fp8_quantize_blocks : moe_fp8_quantize_tiles;
    nt_dqfn df = blocks ? moe_fp8_dequantize_blocks : moe_fp8_dequantize_tiles;
    moe_status rc = qf(ctx, x, rows, cols, B, q, s);
    if (rc != MOE_OK) { T_CHECK(rc == MOE_OK, "%s: quantize -> %d: %s", what, (int)rc, moe_ctx_error(ctx)); return 0; }
    rc = df(ctx, q, s, rows, cols, B, d);
    if (rc != MOE_OK) { T_CHECK(rc == MOE_OK, "%s: dequantize -> %d: %s", what, (int)rc, moe_ctx_error(ctx)); return 0; }
    nt_quant_verify(what, blocks, x, q, s, d, rows, cols, B, st);
    return 1;
}

static void nt_quant_shapes(int blocks) {
    static const int64_t shapes[][3] = {
        { 37, 100, 32 }, { 300, 260, 128 }, { 64, 64, 16 }, { 3, 5, 128 }, { 7, 9, 1 }, { 1, 1, 1 }, { 129, 1, 128 }
    };
    const char *kind = blocks ? "blocks" : "tiles";
    moe_ctx *ctx = NULL;
    nt_qstats st;
    size_t k;
    memset(&st, 0, sizeof st);
    T_ASSERT(moe_ctx_new(&ctx) == MOE_OK && ctx != NULL, "moe_ctx_new failed");
    nt_seed(blocks ? 0x5EEDB10CULL : 0x5EED7113ULL);
    for (k = 0; k < sizeof shapes / sizeof shapes[0]; k++) {
        int64_t rows = shapes[k][0], cols = shapes[k][1], B = shapes[k][2], n = rows * cols;
        int64_t ns = nt_nscales(blocks, rows, cols, B);
        float *x = (float *)malloc((size_t)n * sizeof *x), *d = (float *)malloc((size_t)n * sizeof *d);
        float *s = (float *)malloc((size_t)ns * sizeof *s);
        uint8_t *q = (uint8_t *)malloc((size_t)n);
        char what[96];
        snprintf(what, sizeof what, "%s %lldx%lld B=%lld", kind, (long long)rows, (long long)cols, (long long)B);
        if (x && d && s && q) {
            nt_fill(x, n);
            nt_quant_run(ctx, what, blocks, x, rows, cols, B, q, s, d, &st);
        } else T_CHECK(0, "out of memory");
        free(x); free(d); free(s); free(q);
    }
    T_CHECK(st.bad_bound + st.bad_amax + st.bad_scale + st.bad_deq + st.bad_nan == 0,
            "%s: failures: %lld bound, %lld amax, %lld scale, %lld deq, %lld NaN codes", kind, st.bad_bound,
            st.bad_amax, st.bad_scale, st.bad_deq, st.bad_nan);
    T_NOTE("%lld elements over %d shapes; max |x-deq|/(2^-4|x| + s 2^-9) = %.4f", st.n,
           (int)(sizeof shapes / sizeof shapes[0]), st.worst_ratio);
    T_NOTE("scales != amax/448.0f exactly: %lld; q != e4m3(x/s) exactly: %lld", st.scale_inexact, st.q_exact_miss);
    moe_ctx_free(ctx);
}

static void test_quant_tiles_random(void) { nt_quant_shapes(0); }
static void test_quant_blocks_random(void) { nt_quant_shapes(1); }

/* one outlier (1e4 among values ~1) degrades only its own tile/block; an all-zero tile/block
   comes back as zeros with scale 1 */
static void nt_quant_outlier(int blocks, int64_t rows, int64_t cols, int64_t B, int64_t orow, int64_t ocol,
                             int64_t zrow, int64_t zcol) {
    const char *kind = blocks ? "blocks" : "tiles";
    int64_t n = rows * cols, ns = nt_nscales(blocks, rows, cols, B), i, r, c;
    int64_t otile = nt_sidx(blocks, orow, ocol, cols, B), ztile = nt_sidx(blocks, zrow, zcol, cols, B);
    float *x = (float *)malloc((size_t)n * sizeof *x), *d0 = (float *)malloc((size_t)n * sizeof *d0);
    float *d1 = (float *)malloc((size_t)n * sizeof *d1), *s0 = (float *)malloc((size_t)ns * sizeof *s0);
    float *s1 = (float *)malloc((size_t)ns * sizeof *s1);
    uint8_t *q0 = (uint8_t *)malloc((size_t)n), *q1 = (uint8_t *)malloc((size_t)n);
    moe_ctx *ctx = NULL;
    nt_qstats st;
    long long changed_outside = 0, zero_bad = 0;
    double err_before = 0, err_after = 0;
    char what[96];
    memset(&st, 0, sizeof st);
    if (!(x && d0 && d1 && s0 && s1 && q0 && q1) || moe_ctx_new(&ctx) != MOE_OK) {
        T_CHECK(0, "setup failed");
        goto done;
    }
    T_CHECK(otile != ztile, "test setup: outlier and zero tile coincide");
    nt_seed(blocks ? 0x0B71E5ULL : 0x0771E5ULL);
    for (i = 0; i < n; i++) x[i] = 0.5f + 0.5f * nt_urand(); /* ~1, in [0, 1) */
    for (i = 0; i < n; i++) if (nt_rand32() & 1u) x[i] = -x[i];
    for (r = 0; r < rows; r++)
        for (c = 0; c < cols; c++)
            if (nt_sidx(blocks, r, c, cols, B) == ztile) x[r * cols + c] = ((r + c) & 1) ? -0.0f : 0.0f;
    snprintf(what, sizeof what, "%s %lldx%lld B=%lld, no outlier", kind, (long long)rows, (long long)cols, (long long)B);
    if (!nt_quant_run(ctx, what, blocks, x, rows, cols, B, q0, s0, d0, &st)) goto done;
    x[orow * cols + ocol] = 1e4f;
    snprintf(what, sizeof what, "%s %lldx%lld B=%lld, outlier", kind, (long long)rows, (long long)cols, (long long)B);
    if (!nt_quant_run(ctx, what, blocks, x, rows, cols, B, q1, s1, d1, &st)) goto done;
    for (i = 0; i < ns; i++)
        if (i != otile && nt_fbits(s0[i]) != nt_fbits(s1[i])) changed_outside++;
    for (r = 0; r < rows; r++)
        for (c = 0; c < cols; c++) {
            int64_t e = r * cols + c, t = nt_sidx(blocks, r, c, cols, B);
            if (t != otile) {
                if (q0[e] != q1[e] || nt_fbits(d0[e]) != nt_fbits(d1[e])) changed_outside++;
            } else if (e != orow * cols + ocol) {
                double e0 = fabs((double)x[e] - d0[e]), e1 = fabs((double)x[e] - d1[e]);
                if (e0 > err_before) err_before = e0;
                if (e1 > err_after) err_after = e1;
            }
            if (t == ztile && (d1[e] != 0.0f || d0[e] != 0.0f)) zero_bad++;
        }
    T_CHECK(changed_outside == 0, "%s: outlier changed %lld codes/values/scales outside its own tile", kind,
            changed_outside);
    T_CHECK(fabs((double)s1[otile] - 1e4f / 448.0f) <= ldexp(1e4 / 448.0, -23), /* same 1-ulp rule as above */
            "%s: outlier tile scale %.9g, expected %.9g", kind, (double)s1[otile], (double)(1e4f / 448.0f));
    T_CHECK(q1[orow * cols + ocol] == 0x7E && d1[orow * cols + ocol] == 448.0f * s1[otile],
            "%s: outlier -> q 0x%02X, deq %.9g", kind, q1[orow * cols + ocol], (double)d1[orow * cols + ocol]);
    T_CHECK(err_after > err_before, "%s: outlier tile error did not grow (%.3g -> %.3g)", kind, err_before, err_after);
    T_CHECK(s0[ztile] == 1.0f && s1[ztile] == 1.0f, "%s: all-zero tile scale %.9g / %.9g, expected 1", kind,
            (double)s0[ztile], (double)s1[ztile]);
    T_CHECK(zero_bad == 0, "%s: all-zero tile: %lld nonzero values back", kind, zero_bad);
    T_CHECK(st.bad_bound + st.bad_amax + st.bad_scale + st.bad_deq + st.bad_nan == 0,
            "%s: failures: %lld bound, %lld amax, %lld scale, %lld deq, %lld NaN codes", kind, st.bad_bound,
            st.bad_amax, st.bad_scale, st.bad_deq, st.bad_nan);
    T_NOTE("%s %lldx%lld B=%lld: max error in the outlier's tile %.3g -> %.3g, %lld changes elsewhere", kind,
           (long long)rows, (long long)cols, (long long)B, err_before, err_after, changed_outside);
done:
    moe_ctx_free(ctx);
    free(x); free(d0); free(d1); free(s0); free(s1); free(q0); free(q1);
}

static void test_quant_outlier_and_zero_tile(void) {
    nt_quant_outlier(0, 37, 100, 32, 5, 40, 3, 70);    /* outlier in row 5, col block 1; zero tile row 3 block 2 */
    nt_quant_outlier(1, 300, 260, 128, 130, 5, 20, 258); /* outlier in block (1,0); zero block (0,2) */
}

/* q = e4m3(x / scale) exactly (see NT_Q_RECIPROCAL), at the rounding boundaries: one tile per amax holding amax and,
   for every e4m3 midpoint m, x = m*s and its +-1, +-2 float-ulp neighbours (both signs), so that
   x/s lands on or next to a tie. Expected codes: the brute-force oracle applied to fl(x/s) with
   the scale the call returned. (Computing x * fl(1/s) instead of x / s is not the same: it moves
   some of these across the tie.) */
static void test_quant_near_ties(void) {
    static const float amaxes[] = { 1.0f, 3.0f, 1000.0f, 0.1f, 7e-3f, 1e-30f, 123456.7f };
    enum { NT_NMID = 0x7E, NT_COLS = 1 + NT_NMID * 5 };
    float x[NT_COLS], d[NT_COLS], s[2];
    uint8_t q[NT_COLS];
    moe_ctx *ctx = NULL;
    long long n = 0, bad = 0;
    size_t a;
    int blocks;
    nt_fp8_init(&nt_e4m3);
    T_ASSERT(moe_ctx_new(&ctx) == MOE_OK && ctx != NULL, "moe_ctx_new failed");
    for (blocks = 0; blocks < 2; blocks++)
        for (a = 0; a < sizeof amaxes / sizeof amaxes[0]; a++) {
            float amax = amaxes[a], sc = amax / 448.0f;
            int k, dlt, i = 1;
            moe_status rc;
            x[0] = amax;
            for (k = 0; k < NT_NMID; k++) {
                float m = (float)(0.5 * (nt_e4m3.tab[k] + nt_e4m3.tab[k + 1]));
                for (dlt = -2; dlt <= 2; dlt++) {
                    float v = nt_bitsf(nt_fbits(m * sc) + (uint32_t)(dlt + 2) - 2u);
                    if (v > amax) v = amax;
                    x[i] = (i & 1) ? v : -v;
                    i++;
                }
            }
            rc = blocks ? moe_fp8_quantize_blocks(ctx, x, 1, NT_COLS, NT_COLS, q, s)
                        : moe_fp8_quantize_tiles(ctx, x, 1, NT_COLS, NT_COLS, q, s);
            T_ASSERT(rc == MOE_OK, "quantize -> %d: %s", (int)rc, moe_ctx_error(ctx));
            rc = blocks ? moe_fp8_dequantize_blocks(ctx, q, s, 1, NT_COLS, NT_COLS, d)
                        : moe_fp8_dequantize_tiles(ctx, q, s, 1, NT_COLS, NT_COLS, d);
            T_ASSERT(rc == MOE_OK, "dequantize -> %d: %s", (int)rc, moe_ctx_error(ctx));
            for (i = 0; i < NT_COLS; i++) {
                uint8_t want = nt_fp8_oracle(&nt_e4m3, nt_q_input(x[i], s[0]));
                n++;
                if (q[i] != want) {
                    if (bad < NT_MAXSHOW)
                        T_CHECK(q[i] == want, "%s amax %.9g (scale %a): x = %a (0x%08X), x/s = %a, x*(1/s) = %a -> expected 0x%02X, got 0x%02X",
                                blocks ? "blocks" : "tiles", (double)amax, (double)s[0], (double)x[i],
                                (unsigned)nt_fbits(x[i]), (double)(x[i] / s[0]), (double)(x[i] * (1.0f / s[0])), want, q[i]);
                    bad++;
                }
            }
        }
    T_CHECK(bad == 0, "%lld of %lld near-tie elements not quantized as e4m3(x/scale)", bad, n);
    T_NOTE("%lld elements at/next to e4m3 ties relative to the scale, %lld mismatches", n, bad);
    moe_ctx_free(ctx);
}

/* Tiles whose amax is so small that amax/448 is a subnormal float (amax < 448 FLT_MIN ~ 5.3e-36)
   or even 0 (amax <= 448 * 2^-150). The contract's formula has no exact meaning there (x/0, and
   1/s overflows to inf for amax below ~1.3e-36), so only the minimum is required: finite codes
   and values (no NaN code from finite input), zeros come back as zeros, signs are kept, and
   |deq| <= (1 + 2^-4) amax. Where s is a normal float the usual error bound must also hold. */
static void test_quant_tiny_amax(void) {
    static const float amaxes[] = { 2.0f, 448.0f * FLT_MIN /* s = FLT_MIN exactly */, 1e-35f, 1e-36f, 1e-37f,
                                    1e-40f, 1e-44f };
    enum { NT_TCOLS = 8 };
    moe_ctx *ctx = NULL;
    size_t a;
    int blocks;
    long long bad = 0;
    T_ASSERT(moe_ctx_new(&ctx) == MOE_OK && ctx != NULL, "moe_ctx_new failed");
    for (blocks = 0; blocks < 2; blocks++)
        for (a = 0; a < sizeof amaxes / sizeof amaxes[0]; a++) {
            float am = amaxes[a];
            float x[NT_TCOLS], d[NT_TCOLS], s[1];
            uint8_t q[NT_TCOLS];
            int i, normal_scale;
            double worst = 0;
            moe_status rc;
            x[0] = am; x[1] = 0.0f; x[2] = -am; x[3] = -0.0f; x[4] = am / 3.0f; x[5] = -am / 1000.0f;
            x[6] = am * 0.75f; x[7] = -am / 64.0f;
            rc = blocks ? moe_fp8_quantize_blocks(ctx, x, 1, NT_TCOLS, NT_TCOLS, q, s)
                        : moe_fp8_quantize_tiles(ctx, x, 1, NT_TCOLS, NT_TCOLS, q, s);
            T_ASSERT(rc == MOE_OK, "quantize -> %d: %s", (int)rc, moe_ctx_error(ctx));
            rc = blocks ? moe_fp8_dequantize_blocks(ctx, q, s, 1, NT_TCOLS, NT_TCOLS, d)
                        : moe_fp8_dequantize_tiles(ctx, q, s, 1, NT_TCOLS, NT_TCOLS, d);
            T_ASSERT(rc == MOE_OK, "dequantize -> %d: %s", (int)rc, moe_ctx_error(ctx));
            normal_scale = s[0] >= FLT_MIN;
            for (i = 0; i < NT_TCOLS; i++) {
                double err = fabs((double)x[i] - d[i]);
                int ok = (q[i] & 0x7Fu) != 0x7Fu && isfinite(d[i]) && (x[i] != 0.0f || d[i] == 0.0f)
                         && !(x[i] > 0.0f && d[i] < 0.0f) && !(x[i] < 0.0f && d[i] > 0.0f)
                         && fabs((double)d[i]) <= (1.0 + ldexp(1.0, -4)) * am
                         && (!normal_scale || err <= nt_quant_bound(x[i], s[0]));
                if (x[i] != 0.0f && err / fabs((double)x[i]) > worst) worst = err / fabs((double)x[i]);
                if (!ok) {
                    if (bad < NT_MAXSHOW + 2)
                        T_CHECK(ok, "%s amax %.9g: x = %.9g -> scale %.9g (%s), q 0x%02X, deq %.9g", blocks ? "blocks" : "tiles",
                                (double)am, (double)x[i], (double)s[0], s[0] == 0.0f ? "zero" : normal_scale ? "normal" : "subnormal", q[i],
                                (double)d[i]);
                    bad++;
                }
            }
            if (blocks) T_NOTE("amax %.3g: scale %.3g (%s), worst relative error %.3g", (double)am, (double)s[0],
                               s[0] == 0.0f ? "zero" : normal_scale ? "normal" : "subnormal", worst);
        }
    T_CHECK(bad == 0, "%lld elements of tiny-amax tiles wrong", bad);
    moe_ctx_free(ctx);
}

static void test_quant_bad_args(void) {
    float x[12] = { 0 }, s[12] = { 0 }, d[12] = { 0 };
    uint8_t q[12] = { 0 };
    moe_ctx *ctx = NULL;
    int fn, k, nbad = 0, ncalls = 0;
    T_ASSERT(moe_ctx_new(&ctx) == MOE_OK && ctx != NULL, "moe_ctx_new failed");
    for (fn = 0; fn < 4; fn++) {
        static const char *names[4] = { "quantize_tiles", "quantize_blocks", "dequantize_tiles", "dequantize_blocks" };
        /* rows, cols, block, which pointer is NULL (0 none, 1 input, 2 q/x output, 3 scales) */
        static const int64_t cases[][4] = { { 3, 4, 0, 0 },  { 3, 4, -2, 0 }, { -1, 4, 2, 0 }, { 3, -1, 2, 0 },
                                            { 3, 4, 2, 1 },  { 3, 4, 2, 2 },  { 3, 4, 2, 3 },
                                            { 3, 4, INT64_MIN, 0 }, { INT64_MIN, 4, 2, 0 } };
        for (k = 0; k < (int)(sizeof cases / sizeof cases[0]); k++) {
            int64_t rows = cases[k][0], cols = cases[k][1], B = cases[k][2];
            int which = (int)cases[k][3];
            moe_status rc;
            const char *msg;
            if (fn == 0) rc = moe_fp8_quantize_tiles(ctx, which == 1 ? NULL : x, rows, cols, B, which == 2 ? NULL : q, which == 3 ? NULL : s);
            else if (fn == 1) rc = moe_fp8_quantize_blocks(ctx, which == 1 ? NULL : x, rows, cols, B, which == 2 ? NULL : q, which == 3 ? NULL : s);
            else if (fn == 2) rc = moe_fp8_dequantize_tiles(ctx, which == 1 ? NULL : q, which == 3 ? NULL : s, rows, cols, B, which == 2 ? NULL : d);
            else rc = moe_fp8_dequantize_blocks(ctx, which == 1 ? NULL : q, which == 3 ? NULL : s, rows, cols, B, which == 2 ? NULL : d);
            msg = moe_ctx_error(ctx);
            ncalls++;
            if (rc == MOE_OK || msg == NULL || msg[0] == '\0') {
                nbad++;
                T_CHECK(rc != MOE_OK && msg != NULL && msg[0] != '\0',
                        "moe_fp8_%s(rows %lld, cols %lld, block %lld, null #%d) -> status %d, message \"%s\"",
                        names[fn], (long long)rows, (long long)cols, (long long)B, which, (int)rc, msg ? msg : "(null)");
            }
        }
    }
    /* no context at all: must fail without crashing */
    T_CHECK(moe_fp8_quantize_tiles(NULL, x, 3, 4, 2, q, s) != MOE_OK, "NULL ctx accepted by quantize_tiles");
    T_CHECK(moe_fp8_dequantize_blocks(NULL, q, s, 3, 4, 2, d) != MOE_OK, "NULL ctx accepted by dequantize_blocks");
    /* still usable after errors */
    x[0] = 1.0f; x[5] = -2.0f;
    T_CHECK(moe_fp8_quantize_tiles(ctx, x, 3, 4, 2, q, s) == MOE_OK, "valid call after errors failed: %s",
            moe_ctx_error(ctx));
    T_NOTE("%d bad-argument calls, %d accepted or without a message", ncalls, nbad);
    moe_ctx_free(ctx);
}

int main(int argc, char **argv) {
    t_filter = argc > 1 ? argv[1] : NULL;
    T_RUN_FILTERED(test_fp8_decode_all_codes);
    T_RUN_FILTERED(test_fp8_encode);
    T_RUN_FILTERED(test_bf16);
    T_RUN_FILTERED(test_f16);
    T_RUN_FILTERED(test_quant_tiles_random);
    T_RUN_FILTERED(test_quant_blocks_random);
    T_RUN_FILTERED(test_quant_outlier_and_zero_tile);
    T_RUN_FILTERED(test_quant_near_ties);
    T_RUN_FILTERED(test_quant_tiny_amax);
    T_RUN_FILTERED(test_quant_bad_args);
    return t_summary();
}
