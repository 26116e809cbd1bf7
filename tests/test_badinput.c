/* tests/test_badinput.c: every public entry point refuses bad input cleanly.

   A table of bad-input cases. Each case is a small function that builds valid
   inputs, makes ONE call with something wrong in it and returns that call's
   status. For every case the suite checks that
     1. the status is the one in the table (never MOE_OK),
     2. moe_ctx_error(ctx) is a non-empty message (printed under the case) that
        names the function that refused (when the table gives a name),
     3. nothing crashed: each case runs in a forked child on POSIX systems, so a
        crash, a hang (alarm), a sanitizer report or a leak in one case fails that
        case and the suite goes on,
     4. the context still works afterwards: a small add/sum/backward on the same
        context (no reset) gives the right values.
   Every case gets a fresh context and frees everything, so LeakSanitizer is clean.
   A last case checks that inputs just inside the limits (ignore_index, k == n,
   the last RoPE positions, ...) are accepted.

   Build: cc -std=c99 -O1 -g -ffp-contract=off -Wall -Wextra -Wpedantic -Werror \
             -fopenmp -I. tests/test_badinput.c -o build/test_badinput -lm
          (also compiles as C++: g++ -x c++ -std=c++17 ...)
   Run:   build/test_badinput [case-name-substring]
          MOE_TEST_NOFORK=1 runs the cases in-process (for a debugger). */
#if !defined(_POSIX_C_SOURCE) && (defined(__unix__) || defined(__APPLE__))
#define _POSIX_C_SOURCE 200809L
#endif
#define MOE_IMPLEMENTATION
#include "moe.h"
#include "test.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if !defined(BI_NO_FORK) && (defined(__unix__) || defined(__APPLE__))
#define BI_FORK 1
#include <signal.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>
#else
#define BI_FORK 0
#endif

/* One case asks for a 1 PiB tensor and expects MOE_ERR_MEMORY: let ASan's malloc return
   NULL there instead of aborting the process. */
#if defined(__SANITIZE_ADDRESS__)
#ifdef __cplusplus
extern "C" {
#endif
const char *__asan_default_options(void);
const char *__asan_default_options(void) { return "allocator_may_return_null=1"; }
#ifdef __cplusplus
}
#endif
#endif

/* ---- per-case resources: freed by the harness after the checks ---- */

#define BI_MAX_POOL 16
static moe_tensor *g_pool[BI_MAX_POOL];
static int g_npool;
static moe_rope_table g_tabs[2];
static int g_ntabs;
static char g_setup_err[1024]; /* non-empty: a setup step (not the call under test) failed */

static void setup_fail(moe_ctx *ctx, const char *what, moe_status s) {
    if (!g_setup_err[0])
        snprintf(g_setup_err, sizeof g_setup_err, "setup step %.100s failed: %.40s (%.600s)", what, moe_status_name(s),
                 moe_ctx_error(ctx));
}
/* Require a setup call to succeed. */
static void need(moe_ctx *ctx, moe_status s, const char *what) {
    if (s != MOE_OK) setup_fail(ctx, what, s);
}

/* A heap tensor with deterministic contents (f32: small values; i32: zeros). */
static moe_tensor *mk(moe_ctx *ctx, moe_dtype dt, int ndim, int64_t d0, int64_t d1, int64_t d2, int64_t d3) {
    int64_t shape[4];
    int64_t i;
    moe_tensor *t = NULL;
    moe_status s;
    shape[0] = d0; shape[1] = d1; shape[2] = d2; shape[3] = d3;
    s = moe_tensor_new(ctx, dt, ndim, shape, &t);
    if (s != MOE_OK || !t || g_npool == BI_MAX_POOL) {
        setup_fail(ctx, "moe_tensor_new", s);
        moe_tensor_free(ctx, t);
        return NULL;
    }
    g_pool[g_npool++] = t;
    if (dt != MOE_I32)
        for (i = 0; i < t->numel; i++) moe_tensor_set(t, i, 0.25 * (double)(i % 5 - 2));
    return t;
}
#define F1(a) mk(ctx, MOE_F32, 1, a, 1, 1, 1)
#define F2(a, b) mk(ctx, MOE_F32, 2, a, b, 1, 1)
#define F3(a, b, c) mk(ctx, MOE_F32, 3, a, b, c, 1)
#define F4(a, b, c, d) mk(ctx, MOE_F32, 4, a, b, c, d)
#define I1(a) mk(ctx, MOE_I32, 1, a, 1, 1, 1)
#define I2(a, b) mk(ctx, MOE_I32, 2, a, b, 1, 1)

static void seti(moe_tensor *t, int64_t i, int v) {
    if (t) moe_tensor_set(t, i, (double)v);
}

/* A RoPE table for theta 10000, freed by the harness. */
static moe_rope_table *mk_rope(moe_ctx *ctx, int64_t dim, int64_t max_pos) {
    moe_rope_table *tab = &g_tabs[g_ntabs++];
    need(ctx, moe_rope_table_init(ctx, tab, dim, max_pos, 10000.0, NULL), "moe_rope_table_init");
    return tab;
}

/* A parameter x [2, 3] with gradients and loss = sum(scale(x, 1)) (recorded on the tape). */
static moe_tensor *mk_loss(moe_ctx *ctx, moe_tensor **param) {
    moe_tensor *x = F2(2, 3), *y = NULL, *l = NULL;
    if (param) *param = x;
    if (!x) return NULL;
    need(ctx, moe_tensor_set_requires_grad(ctx, x, 1), "moe_tensor_set_requires_grad");
    need(ctx, moe_scale(ctx, x, 1.0f, &y), "moe_scale");
    if (y) need(ctx, moe_sum(ctx, y, &l), "moe_sum");
    return l;
}

/* A valid GEMM: C[2,3] = A[2,4]·B[4,3] on static buffers. */
static float g_ga[8], g_gb[12], g_gc[6];
static moe_gemm_args gemm_ok(void) {
    moe_gemm_args g;
    memset(&g, 0, sizeof g);
    g.m = 2; g.n = 3; g.k = 4;
    g.a = g_ga; g.a_dtype = MOE_F32; g.lda = 4;
    g.b = g_gb; g.b_dtype = MOE_F32; g.ldb = 3;
    g.c = g_gc; g.ldc = 3;
    g.alpha = 1.0f; g.beta = 0.0f;
    g.compute = MOE_F32;
    return g;
}

static float g_fx[64], g_fs[64];
static uint8_t g_fq[64];

/* ============================================================================================
   The cases: each returns the status of one call with bad input.
   ============================================================================================ */

#define CASE(name) static moe_status name(moe_ctx *ctx)

/* ---- NULL context ---- */
CASE(null_out_ctx_new) { (void)ctx; return moe_ctx_new(NULL); }
CASE(null_ctx_set_threads) { (void)ctx; return moe_ctx_set_threads(NULL, 4); }
CASE(null_ctx_tensor_new) {
    int64_t s = 4;
    moe_tensor *t = NULL;
    moe_status st = moe_tensor_new(NULL, MOE_F32, 1, &s, &t);
    moe_tensor_free(ctx, t);
    return st;
}
CASE(null_ctx_matmul) {
    moe_tensor *x = F2(2, 3), *w = F2(4, 3), *y = NULL;
    return moe_matmul(NULL, x, w, &y);
}
CASE(null_ctx_add) {
    moe_tensor *a = F1(3), *y = NULL;
    return moe_add(NULL, a, a, &y);
}
CASE(null_ctx_backward) {
    moe_tensor *l = mk_loss(ctx, NULL);
    return moe_backward(NULL, l);
}
CASE(null_ctx_gemm) {
    moe_gemm_args g = gemm_ok();
    (void)ctx;
    return moe_gemm(NULL, &g);
}
CASE(null_ctx_fp8_quantize) { (void)ctx; return moe_fp8_quantize_tiles(NULL, g_fx, 2, 8, 4, g_fq, g_fs); }

/* ---- context settings ---- */
CASE(set_threads_zero) { return moe_ctx_set_threads(ctx, 0); }
CASE(set_threads_negative) { return moe_ctx_set_threads(ctx, -4); }
CASE(set_threads_too_many) { return moe_ctx_set_threads(ctx, 1 << 20); }
CASE(gemm_precision_i32) { return moe_ctx_set_gemm_precision(ctx, MOE_I32); }

/* ---- tensor creation ---- */
CASE(tensor_new_zero_dim) {
    int64_t s[2] = {2, 0};
    moe_tensor *t = NULL;
    moe_status st = moe_tensor_new(ctx, MOE_F32, 2, s, &t);
    moe_tensor_free(ctx, t);
    return st;
}
CASE(tensor_new_negative_dim) {
    int64_t s[2] = {4, -3};
    moe_tensor *t = NULL;
    moe_status st = moe_tensor_new(ctx, MOE_F32, 2, s, &t);
    moe_tensor_free(ctx, t);
    return st;
}
CASE(tensor_new_ndim0) {
    int64_t s[1] = {4};
    moe_tensor *t = NULL;
    moe_status st = moe_tensor_new(ctx, MOE_F32, 0, s, &t);
    moe_tensor_free(ctx, t);
    return st;
}
CASE(tensor_new_ndim5) {
    int64_t s[5] = {2, 2, 2, 2, 2};
    moe_tensor *t = NULL;
    moe_status st = moe_tensor_new(ctx, MOE_F32, 5, s, &t);
    moe_tensor_free(ctx, t);
    return st;
}
CASE(tensor_new_size_overflow) {
    int64_t s[2] = {(int64_t)1 << 40, (int64_t)1 << 40};
    moe_tensor *t = NULL;
    moe_status st = moe_tensor_new(ctx, MOE_F32, 2, s, &t);
    moe_tensor_free(ctx, t);
    return st;
}
CASE(tensor_new_int64_wrap) { /* 2^124 elements: wraps int64 to 0 if multiplied naively */
    int64_t s[4] = {(int64_t)1 << 31, (int64_t)1 << 31, (int64_t)1 << 31, (int64_t)1 << 31};
    moe_tensor *t = NULL;
    moe_status st = moe_tensor_new(ctx, MOE_BF16, 4, s, &t);
    moe_tensor_free(ctx, t);
    return st;
}
CASE(tensor_new_1pib) { /* 2^48 f32 elements: no overflow, but no machine has 1 PiB */
    int64_t s[2] = {(int64_t)1 << 24, (int64_t)1 << 24};
    moe_tensor *t = NULL;
    moe_status st = moe_tensor_new(ctx, MOE_F32, 2, s, &t);
    moe_tensor_free(ctx, t);
    return st;
}
CASE(tensor_new_dtype_count) {
    int64_t s = 4;
    moe_tensor *t = NULL;
    moe_status st = moe_tensor_new(ctx, MOE_DTYPE_COUNT, 1, &s, &t);
    moe_tensor_free(ctx, t);
    return st;
}
CASE(tensor_new_dtype_7) {
    int64_t s = 4;
    moe_tensor *t = NULL;
    moe_status st = moe_tensor_new(ctx, (moe_dtype)7, 1, &s, &t);
    moe_tensor_free(ctx, t);
    return st;
}
#ifndef __cplusplus /* values outside the enum's range are undefined behaviour in C++ */
CASE(tensor_new_dtype_negative) {
    int64_t s = 4;
    moe_tensor *t = NULL;
    moe_status st = moe_tensor_new(ctx, (moe_dtype)-1, 1, &s, &t);
    moe_tensor_free(ctx, t);
    return st;
}
CASE(tensor_new_dtype_1000) {
    int64_t s = 4;
    moe_tensor *t = NULL;
    moe_status st = moe_tensor_new(ctx, (moe_dtype)1000, 1, &s, &t);
    moe_tensor_free(ctx, t);
    return st;
}
#endif
CASE(tensor_new_null_shape) {
    moe_tensor *t = NULL;
    moe_status st = moe_tensor_new(ctx, MOE_F32, 2, NULL, &t);
    moe_tensor_free(ctx, t);
    return st;
}
CASE(tensor_new_null_out) {
    int64_t s = 4;
    return moe_tensor_new(ctx, MOE_F32, 1, &s, NULL);
}
CASE(tensor_temp_arena_limit) {
    int64_t s[2] = {64, 64};
    moe_tensor *t = NULL;
    need(ctx, moe_ctx_set_arena_limit(ctx, 4096), "moe_ctx_set_arena_limit");
    return moe_tensor_temp(ctx, MOE_F32, 2, s, &t);
}
CASE(view_out_of_bounds) {
    moe_tensor *t = F2(4, 4), *v = NULL;
    int64_t s[2] = {3, 4};
    return moe_tensor_view(ctx, t, 2, s, 8, &v);
}
CASE(view_negative_offset) {
    moe_tensor *t = F2(4, 4), *v = NULL;
    int64_t s[1] = {4};
    return moe_tensor_view(ctx, t, 1, s, -1, &v);
}
CASE(view_offset_past_end) {
    moe_tensor *t = F2(4, 4), *v = NULL;
    int64_t s[1] = {1};
    return moe_tensor_view(ctx, t, 1, s, 16, &v);
}
CASE(view_ndim5) {
    moe_tensor *t = F2(4, 4), *v = NULL;
    int64_t s[5] = {1, 1, 1, 1, 16};
    return moe_tensor_view(ctx, t, 5, s, 0, &v);
}
CASE(view_null_out) {
    moe_tensor *t = F2(4, 4);
    int64_t s[1] = {4};
    return moe_tensor_view(ctx, t, 1, s, 0, NULL);
}
CASE(requires_grad_i32) {
    moe_tensor *t = I1(4);
    return moe_tensor_set_requires_grad(ctx, t, 1);
}
CASE(requires_grad_bf16) {
    moe_tensor *t = mk(ctx, MOE_BF16, 1, 4, 1, 1, 1);
    return moe_tensor_set_requires_grad(ctx, t, 1);
}
CASE(requires_grad_op_output) {
    moe_tensor *x = F1(4), *y = NULL;
    need(ctx, moe_scale(ctx, x, 2.0f, &y), "moe_scale");
    return moe_tensor_set_requires_grad(ctx, y, 1);
}
CASE(requires_grad_null) { return moe_tensor_set_requires_grad(ctx, NULL, 1); }
CASE(copy_size_mismatch) {
    moe_tensor *a = F2(2, 3), *b = F2(3, 3);
    return moe_tensor_copy(ctx, a, b);
}
CASE(copy_null_src) {
    moe_tensor *a = F2(2, 3);
    return moe_tensor_copy(ctx, a, NULL);
}
CASE(fill_null) { return moe_tensor_fill(ctx, NULL, 1.0); }
CASE(fill_normal_i32) {
    moe_tensor *t = I1(8);
    moe_rng r = moe_rng_new(1, 0);
    return moe_tensor_fill_normal(ctx, t, &r, 0.0f, 1.0f);
}
CASE(fill_normal_negative_std) {
    moe_tensor *t = F1(8);
    moe_rng r = moe_rng_new(1, 0);
    return moe_tensor_fill_normal(ctx, t, &r, 0.0f, -1.0f);
}
CASE(fill_normal_nan_mean) {
    moe_tensor *t = F1(8);
    moe_rng r = moe_rng_new(1, 0);
    return moe_tensor_fill_normal(ctx, t, &r, (float)NAN, 1.0f);
}
CASE(fill_normal_inf_std) {
    moe_tensor *t = F1(8);
    moe_rng r = moe_rng_new(1, 0);
    return moe_tensor_fill_normal(ctx, t, &r, 0.0f, (float)INFINITY);
}
CASE(fill_normal_null_rng) {
    moe_tensor *t = F1(8);
    return moe_tensor_fill_normal(ctx, t, NULL, 0.0f, 1.0f);
}

/* ---- FP8 quantisation ---- */
CASE(fp8_tiles_block0) { return moe_fp8_quantize_tiles(ctx, g_fx, 2, 8, 0, g_fq, g_fs); }
CASE(fp8_tiles_negative_block) { return moe_fp8_quantize_tiles(ctx, g_fx, 2, 8, -128, g_fq, g_fs); }
CASE(fp8_tiles_negative_rows) { return moe_fp8_quantize_tiles(ctx, g_fx, -2, 8, 4, g_fq, g_fs); }
CASE(fp8_tiles_null_x) { return moe_fp8_quantize_tiles(ctx, NULL, 2, 8, 4, g_fq, g_fs); }
CASE(fp8_tiles_null_q) { return moe_fp8_quantize_tiles(ctx, g_fx, 2, 8, 4, NULL, g_fs); }
CASE(fp8_blocks_null_scales) { return moe_fp8_quantize_blocks(ctx, g_fx, 8, 8, 4, g_fq, NULL); }
CASE(fp8_blocks_negative_cols) { return moe_fp8_quantize_blocks(ctx, g_fx, 8, -8, 4, g_fq, g_fs); }
CASE(fp8_dequant_tiles_block0) { return moe_fp8_dequantize_tiles(ctx, g_fq, g_fs, 2, 8, 0, g_fx); }
CASE(fp8_dequant_blocks_null_out) { return moe_fp8_dequantize_blocks(ctx, g_fq, g_fs, 8, 8, 4, NULL); }

/* ---- GEMM ---- */
CASE(gemm_null_args) { return moe_gemm(ctx, NULL); }
CASE(gemm_negative_m) {
    moe_gemm_args g = gemm_ok();
    g.m = -2;
    return moe_gemm(ctx, &g);
}
CASE(gemm_negative_k) {
    moe_gemm_args g = gemm_ok();
    g.k = -1;
    return moe_gemm(ctx, &g);
}
CASE(gemm_i32_a) {
    moe_gemm_args g = gemm_ok();
    g.a_dtype = MOE_I32;
    return moe_gemm(ctx, &g);
}
CASE(gemm_fp8_b) {
    moe_gemm_args g = gemm_ok();
    g.b_dtype = MOE_FP8_E4M3;
    return moe_gemm(ctx, &g);
}
CASE(gemm_compute_f16) {
    moe_gemm_args g = gemm_ok();
    g.compute = MOE_F16;
    return moe_gemm(ctx, &g);
}
CASE(gemm_null_a) {
    moe_gemm_args g = gemm_ok();
    g.a = NULL;
    return moe_gemm(ctx, &g);
}
CASE(gemm_null_b) {
    moe_gemm_args g = gemm_ok();
    g.b = NULL;
    return moe_gemm(ctx, &g);
}
CASE(gemm_null_c) {
    moe_gemm_args g = gemm_ok();
    g.c = NULL;
    return moe_gemm(ctx, &g);
}
CASE(gemm_small_lda) {
    moe_gemm_args g = gemm_ok();
    g.lda = 3; /* A is [2, 4] */
    return moe_gemm(ctx, &g);
}
CASE(gemm_small_ldc) {
    moe_gemm_args g = gemm_ok();
    g.ldc = 2; /* C is [2, 3] */
    return moe_gemm(ctx, &g);
}

/* ---- matmul / element-wise ---- */
CASE(matmul_inner_dim) {
    moe_tensor *x = F2(2, 3), *w = F2(5, 4), *y = NULL;
    return moe_matmul(ctx, x, w, &y);
}
CASE(matmul_batched_count) {
    moe_tensor *x = F3(2, 3, 4), *w = F3(3, 5, 4), *y = NULL;
    return moe_matmul(ctx, x, w, &y);
}
CASE(matmul_w_1d) {
    moe_tensor *x = F2(2, 4), *w = F1(4), *y = NULL;
    return moe_matmul(ctx, x, w, &y);
}
CASE(matmul_i32_x) {
    moe_tensor *x = I2(2, 4), *w = F2(3, 4), *y = NULL;
    return moe_matmul(ctx, x, w, &y);
}
CASE(matmul_bf16_w) {
    moe_tensor *x = F2(2, 4), *w = mk(ctx, MOE_BF16, 2, 3, 4, 1, 1), *y = NULL;
    return moe_matmul(ctx, x, w, &y);
}
CASE(matmul_null_w) {
    moe_tensor *x = F2(2, 4), *y = NULL;
    return moe_matmul(ctx, x, NULL, &y);
}
CASE(matmul_null_out) {
    moe_tensor *x = F2(2, 4), *w = F2(3, 4);
    return moe_matmul(ctx, x, w, NULL);
}
CASE(matmul_arena_limit) {
    moe_tensor *x = F2(64, 64), *w = F2(64, 64), *y = NULL;
    need(ctx, moe_ctx_set_arena_limit(ctx, 4096), "moe_ctx_set_arena_limit");
    return moe_matmul(ctx, x, w, &y); /* y alone needs 16 KiB */
}
CASE(add_shape) {
    moe_tensor *a = F2(2, 3), *b = F2(3, 2), *y = NULL;
    return moe_add(ctx, a, b, &y);
}
CASE(add_bad_broadcast) {
    moe_tensor *a = F2(2, 3), *b = F1(2), *y = NULL;
    return moe_add(ctx, a, b, &y);
}
CASE(add_null_a) {
    moe_tensor *b = F1(3), *y = NULL;
    return moe_add(ctx, NULL, b, &y);
}
CASE(add_null_out) {
    moe_tensor *a = F1(3);
    return moe_add(ctx, a, a, NULL);
}
CASE(mul_shape) {
    moe_tensor *a = F2(2, 3), *b = F1(3), *y = NULL; /* mul does not broadcast */
    return moe_mul(ctx, a, b, &y);
}
CASE(mul_bf16) {
    moe_tensor *a = mk(ctx, MOE_BF16, 1, 3, 1, 1, 1), *b = F1(3), *y = NULL;
    return moe_mul(ctx, a, b, &y);
}
CASE(scale_nan) {
    moe_tensor *x = F1(3), *y = NULL;
    return moe_scale(ctx, x, (float)NAN, &y);
}
CASE(scale_inf) {
    moe_tensor *x = F1(3), *y = NULL;
    return moe_scale(ctx, x, -(float)INFINITY, &y);
}
CASE(scale_null_out) {
    moe_tensor *x = F1(3);
    return moe_scale(ctx, x, 2.0f, NULL);
}
CASE(sum_null_x) {
    moe_tensor *y = NULL;
    return moe_sum(ctx, NULL, &y);
}
CASE(sum_i32) {
    moe_tensor *x = I1(3), *y = NULL;
    return moe_sum(ctx, x, &y);
}
CASE(silu_null_out) {
    moe_tensor *x = F1(3);
    return moe_silu(ctx, x, NULL);
}
CASE(silu_f16) {
    moe_tensor *x = mk(ctx, MOE_F16, 1, 3, 1, 1, 1), *y = NULL;
    return moe_silu(ctx, x, &y);
}
CASE(swiglu_shape) {
    moe_tensor *g = F2(2, 8), *u = F2(2, 4), *y = NULL;
    return moe_swiglu(ctx, g, u, &y);
}
CASE(swiglu_null_up) {
    moe_tensor *g = F2(2, 8), *y = NULL;
    return moe_swiglu(ctx, g, NULL, &y);
}
CASE(softmax_i32) {
    moe_tensor *x = I2(2, 3), *y = NULL;
    return moe_softmax(ctx, x, &y);
}
CASE(softmax_null_out) {
    moe_tensor *x = F2(2, 3);
    return moe_softmax(ctx, x, NULL);
}

/* ---- rmsnorm ---- */
CASE(rmsnorm_weight_size) {
    moe_tensor *x = F2(2, 4), *w = F1(3), *y = NULL;
    return moe_rmsnorm(ctx, x, w, 1e-6f, &y);
}
CASE(rmsnorm_weight_2d) {
    moe_tensor *x = F2(2, 4), *w = F2(1, 4), *y = NULL;
    return moe_rmsnorm(ctx, x, w, 1e-6f, &y);
}
CASE(rmsnorm_bf16_x) {
    moe_tensor *x = mk(ctx, MOE_BF16, 2, 2, 4, 1, 1), *w = F1(4), *y = NULL;
    return moe_rmsnorm(ctx, x, w, 1e-6f, &y);
}
CASE(rmsnorm_eps_zero) {
    moe_tensor *x = F2(2, 4), *w = F1(4), *y = NULL;
    return moe_rmsnorm(ctx, x, w, 0.0f, &y);
}
CASE(rmsnorm_null_w) {
    moe_tensor *x = F2(2, 4), *y = NULL;
    return moe_rmsnorm(ctx, x, NULL, 1e-6f, &y);
}

/* ---- RoPE ---- */
CASE(rope_table_odd_dim) {
    moe_rope_table *tab = &g_tabs[g_ntabs++];
    return moe_rope_table_init(ctx, tab, 7, 16, 10000.0, NULL);
}
CASE(rope_table_zero_dim) {
    moe_rope_table *tab = &g_tabs[g_ntabs++];
    return moe_rope_table_init(ctx, tab, 0, 16, 10000.0, NULL);
}
/* volatile: at -O3 GCC would otherwise see the overflow at compile time (-Warray-bounds) */
static volatile int64_t g_huge_dim = (int64_t)1 << 62;
CASE(rope_table_huge_dim) { /* dim·4 bytes would wrap size_t to 0: must be refused */
    moe_rope_table *tab = &g_tabs[g_ntabs++];
    return moe_rope_table_init(ctx, tab, g_huge_dim, 1, 10000.0, NULL);
}
CASE(rope_table_max_pos0) {
    moe_rope_table *tab = &g_tabs[g_ntabs++];
    return moe_rope_table_init(ctx, tab, 8, 0, 10000.0, NULL);
}
CASE(rope_table_theta1) {
    moe_rope_table *tab = &g_tabs[g_ntabs++];
    return moe_rope_table_init(ctx, tab, 8, 16, 1.0, NULL);
}
CASE(rope_table_null) { return moe_rope_table_init(ctx, NULL, 8, 16, 10000.0, NULL); }
CASE(rope_table_dim_mismatch) {
    moe_rope_table *tab = mk_rope(ctx, 8, 16);
    moe_tensor *x = F3(4, 2, 4), *y = NULL; /* head dim 4, table for 8 */
    return moe_rope(ctx, x, tab, 0, MOE_ROPE_PAIRS, &y);
}
CASE(rope_beyond_max_pos) {
    moe_rope_table *tab = mk_rope(ctx, 8, 16);
    moe_tensor *x = F3(4, 2, 8), *y = NULL; /* positions 13..16, table has 0..15 */
    return moe_rope(ctx, x, tab, 13, MOE_ROPE_HALVES, &y);
}
CASE(rope_t_beyond_max_pos) {
    moe_rope_table *tab = mk_rope(ctx, 8, 4);
    moe_tensor *x = F4(1, 5, 2, 8), *y = NULL; /* 5 tokens, 4 positions */
    return moe_rope(ctx, x, tab, 0, MOE_ROPE_PAIRS, &y);
}
CASE(rope_negative_pos) {
    moe_rope_table *tab = mk_rope(ctx, 8, 16);
    moe_tensor *x = F3(4, 2, 8), *y = NULL;
    return moe_rope(ctx, x, tab, -1, MOE_ROPE_PAIRS, &y);
}
CASE(rope_x_2d) {
    moe_rope_table *tab = mk_rope(ctx, 8, 16);
    moe_tensor *x = F2(4, 8), *y = NULL;
    return moe_rope(ctx, x, tab, 0, MOE_ROPE_PAIRS, &y);
}
CASE(rope_null_table) {
    moe_tensor *x = F3(4, 2, 8), *y = NULL;
    return moe_rope(ctx, x, NULL, 0, MOE_ROPE_PAIRS, &y);
}
CASE(rope_uninit_table) {
    moe_rope_table tab;
    moe_tensor *x = F3(4, 2, 8), *y = NULL;
    memset(&tab, 0, sizeof tab);
    return moe_rope(ctx, x, &tab, 0, MOE_ROPE_PAIRS, &y);
}
#ifndef __cplusplus
CASE(rope_bad_layout) {
    moe_rope_table *tab = mk_rope(ctx, 8, 16);
    moe_tensor *x = F3(4, 2, 8), *y = NULL;
    return moe_rope(ctx, x, tab, 0, (moe_rope_layout)2, &y);
}
#endif

/* ---- attention ---- */
CASE(attention_qk_dim) {
    moe_tensor *q = F3(4, 2, 8), *k = F3(4, 2, 6), *v = F3(4, 2, 8), *o = NULL;
    return moe_attention(ctx, q, k, v, 0.35f, &o);
}
CASE(attention_k_time) {
    moe_tensor *q = F3(4, 2, 8), *k = F3(3, 2, 8), *v = F3(4, 2, 8), *o = NULL;
    return moe_attention(ctx, q, k, v, 0.35f, &o);
}
CASE(attention_v_heads) {
    moe_tensor *q = F4(1, 4, 2, 8), *k = F4(1, 4, 2, 8), *v = F4(1, 4, 3, 8), *o = NULL;
    return moe_attention(ctx, q, k, v, 0.35f, &o);
}
CASE(attention_v_ndim) {
    moe_tensor *q = F3(4, 2, 8), *k = F3(4, 2, 8), *v = F4(1, 4, 2, 8), *o = NULL;
    return moe_attention(ctx, q, k, v, 0.35f, &o);
}
CASE(attention_2d) {
    moe_tensor *q = F2(4, 8), *k = F2(4, 8), *v = F2(4, 8), *o = NULL;
    return moe_attention(ctx, q, k, v, 0.35f, &o);
}
CASE(attention_scale_zero) {
    moe_tensor *q = F3(4, 2, 8), *k = F3(4, 2, 8), *v = F3(4, 2, 8), *o = NULL;
    return moe_attention(ctx, q, k, v, 0.0f, &o);
}
CASE(attention_scale_negative) {
    moe_tensor *q = F3(4, 2, 8), *k = F3(4, 2, 8), *v = F3(4, 2, 8), *o = NULL;
    return moe_attention(ctx, q, k, v, -0.35f, &o);
}
CASE(attention_null_v) {
    moe_tensor *q = F3(4, 2, 8), *k = F3(4, 2, 8), *o = NULL;
    return moe_attention(ctx, q, k, NULL, 0.35f, &o);
}
CASE(attention_null_out) {
    moe_tensor *q = F3(4, 2, 8);
    return moe_attention(ctx, q, q, q, 0.35f, NULL);
}

/* ---- embedding / cross-entropy ---- */
CASE(embedding_f32_ids) {
    moe_tensor *tab = F2(10, 4), *ids = F1(3), *y = NULL;
    return moe_embedding(ctx, tab, ids, &y);
}
CASE(embedding_id_negative) {
    moe_tensor *tab = F2(10, 4), *ids = I1(3), *y = NULL;
    seti(ids, 1, -1);
    return moe_embedding(ctx, tab, ids, &y);
}
CASE(embedding_id_eq_V) {
    moe_tensor *tab = F2(10, 4), *ids = I1(3), *y = NULL;
    seti(ids, 0, 3);
    seti(ids, 2, 10);
    return moe_embedding(ctx, tab, ids, &y);
}
CASE(embedding_table_3d) {
    moe_tensor *tab = F3(10, 2, 2), *ids = I1(3), *y = NULL;
    return moe_embedding(ctx, tab, ids, &y);
}
CASE(embedding_ids_4d) {
    moe_tensor *tab = F2(10, 4), *ids = mk(ctx, MOE_I32, 4, 1, 1, 1, 2), *y = NULL;
    return moe_embedding(ctx, tab, ids, &y);
}
CASE(embedding_null_ids) {
    moe_tensor *tab = F2(10, 4), *y = NULL;
    return moe_embedding(ctx, tab, NULL, &y);
}
CASE(xent_targets_count) {
    moe_tensor *lg = F2(3, 5), *t = I1(2), *l = NULL;
    return moe_cross_entropy(ctx, lg, t, -100, &l);
}
CASE(xent_target_eq_V) {
    moe_tensor *lg = F2(3, 5), *t = I1(3), *l = NULL;
    seti(t, 0, -100); /* ignored: fine */
    seti(t, 1, 5);
    return moe_cross_entropy(ctx, lg, t, -100, &l);
}
CASE(xent_target_negative) {
    moe_tensor *lg = F2(3, 5), *t = I1(3), *l = NULL;
    seti(t, 0, -100); /* ignored: fine */
    seti(t, 2, -1);   /* not the ignore index */
    return moe_cross_entropy(ctx, lg, t, -100, &l);
}
CASE(xent_f32_targets) {
    moe_tensor *lg = F2(3, 5), *t = F1(3), *l = NULL;
    return moe_cross_entropy(ctx, lg, t, -100, &l);
}
CASE(xent_null_loss) {
    moe_tensor *lg = F2(3, 5), *t = I1(3);
    return moe_cross_entropy(ctx, lg, t, -100, NULL);
}

/* ---- top-k / gather / scatter ---- */
CASE(topk_k0) {
    moe_tensor *x = F2(2, 6), *v = NULL, *i = NULL;
    return moe_topk(ctx, x, 0, &v, &i);
}
CASE(topk_k_negative) {
    moe_tensor *x = F2(2, 6), *v = NULL, *i = NULL;
    return moe_topk(ctx, x, -3, &v, &i);
}
CASE(topk_k_gt_n) {
    moe_tensor *x = F2(2, 6), *v = NULL, *i = NULL;
    return moe_topk(ctx, x, 7, &v, &i);
}
CASE(topk_null_indices) {
    moe_tensor *x = F2(2, 6), *v = NULL;
    return moe_topk(ctx, x, 2, &v, NULL);
}
CASE(gather_index_eq_N) {
    moe_tensor *x = F2(5, 3), *idx = I1(4), *y = NULL;
    seti(idx, 3, 5);
    return moe_gather(ctx, x, idx, &y);
}
CASE(gather_index_negative) {
    moe_tensor *x = F2(5, 3), *idx = I1(4), *y = NULL;
    seti(idx, 0, -2);
    return moe_gather(ctx, x, idx, &y);
}
CASE(gather_idx_2d) {
    moe_tensor *x = F2(5, 3), *idx = I2(2, 2), *y = NULL;
    return moe_gather(ctx, x, idx, &y);
}
CASE(gather_f32_idx) {
    moe_tensor *x = F2(5, 3), *idx = F1(4), *y = NULL;
    return moe_gather(ctx, x, idx, &y);
}
CASE(scatter_add_nrows0) {
    moe_tensor *src = F2(4, 3), *idx = I1(4), *y = NULL;
    return moe_scatter_add(ctx, src, idx, 0, &y);
}
CASE(scatter_add_nrows_negative) {
    moe_tensor *src = F2(4, 3), *idx = I1(4), *y = NULL;
    return moe_scatter_add(ctx, src, idx, -5, &y);
}
CASE(scatter_add_index_eq_nrows) {
    moe_tensor *src = F2(4, 3), *idx = I1(4), *y = NULL;
    seti(idx, 2, 6);
    return moe_scatter_add(ctx, src, idx, 6, &y);
}
CASE(scatter_add_idx_len) {
    moe_tensor *src = F2(4, 3), *idx = I1(3), *y = NULL;
    return moe_scatter_add(ctx, src, idx, 6, &y);
}

/* ---- concat / split ---- */
CASE(concat_dim_too_big) {
    moe_tensor *a = F2(2, 3), *b = F2(2, 3), *y = NULL;
    return moe_concat(ctx, a, b, 2, &y);
}
CASE(concat_dim_negative) {
    moe_tensor *a = F2(2, 3), *b = F2(2, 3), *y = NULL;
    return moe_concat(ctx, a, b, -1, &y);
}
CASE(concat_other_dim_differs) {
    moe_tensor *a = F2(2, 3), *b = F2(3, 4), *y = NULL;
    return moe_concat(ctx, a, b, 1, &y);
}
CASE(concat_ndim_differs) {
    moe_tensor *a = F2(2, 3), *b = F3(2, 3, 1), *y = NULL;
    return moe_concat(ctx, a, b, 0, &y);
}
CASE(concat_null_b) {
    moe_tensor *a = F2(2, 3), *y = NULL;
    return moe_concat(ctx, a, NULL, 0, &y);
}
CASE(split_size0_zero) {
    moe_tensor *x = F2(4, 6), *a = NULL, *b = NULL;
    return moe_split(ctx, x, 1, 0, &a, &b);
}
CASE(split_size0_eq_dim) {
    moe_tensor *x = F2(4, 6), *a = NULL, *b = NULL;
    return moe_split(ctx, x, 1, 6, &a, &b);
}
CASE(split_size0_gt_dim) {
    moe_tensor *x = F2(4, 6), *a = NULL, *b = NULL;
    return moe_split(ctx, x, 0, 9, &a, &b);
}
CASE(split_dim_out_of_range) {
    moe_tensor *x = F2(4, 6), *a = NULL, *b = NULL;
    return moe_split(ctx, x, 2, 1, &a, &b);
}
CASE(split_null_b) {
    moe_tensor *x = F2(4, 6), *a = NULL;
    return moe_split(ctx, x, 1, 2, &a, NULL);
}

/* ---- backward ---- */
CASE(backward_non_scalar) {
    moe_tensor *x = F2(2, 3), *y = NULL;
    need(ctx, moe_tensor_set_requires_grad(ctx, x, 1), "moe_tensor_set_requires_grad");
    need(ctx, moe_scale(ctx, x, 2.0f, &y), "moe_scale");
    return moe_backward(ctx, y);
}
CASE(backward_twice) {
    moe_tensor *l = mk_loss(ctx, NULL);
    need(ctx, moe_backward(ctx, l), "first moe_backward");
    return moe_backward(ctx, l);
}
CASE(backward_nan_loss) {
    moe_tensor *x = F2(2, 3), *l = NULL;
    need(ctx, moe_tensor_set_requires_grad(ctx, x, 1), "moe_tensor_set_requires_grad");
    if (x) moe_tensor_set(x, 4, NAN);
    need(ctx, moe_sum(ctx, x, &l), "moe_sum");
    return moe_backward(ctx, l);
}
CASE(backward_inf_loss) {
    moe_tensor *x = F2(2, 3), *y = NULL, *l = NULL;
    need(ctx, moe_tensor_set_requires_grad(ctx, x, 1), "moe_tensor_set_requires_grad");
    if (x) moe_tensor_set(x, 0, 1e30);
    need(ctx, moe_scale(ctx, x, 1e30f, &y), "moe_scale"); /* 1e60 overflows f32 */
    if (y) need(ctx, moe_sum(ctx, y, &l), "moe_sum");
    return moe_backward(ctx, l);
}
CASE(backward_nothing_requires_grad) {
    moe_tensor *x = F2(2, 3), *l = NULL;
    need(ctx, moe_sum(ctx, x, &l), "moe_sum");
    return moe_backward(ctx, l);
}
CASE(backward_recording_off) {
    moe_tensor *x = F2(2, 3), *l = NULL;
    moe_status s;
    need(ctx, moe_tensor_set_requires_grad(ctx, x, 1), "moe_tensor_set_requires_grad");
    need(ctx, moe_ctx_set_grad_enabled(ctx, 0), "moe_ctx_set_grad_enabled");
    need(ctx, moe_sum(ctx, x, &l), "moe_sum");
    s = moe_backward(ctx, l);
    moe_ctx_set_grad_enabled(ctx, 1); /* for the still-works check */
    return s;
}
CASE(backward_null_loss) { return moe_backward(ctx, NULL); }
CASE(backward_arena_limit) { /* the forward fits, the gradients do not */
    moe_tensor *x = F2(32, 32), *y = NULL, *l = NULL;
    moe_status s;
    need(ctx, moe_tensor_set_requires_grad(ctx, x, 1), "moe_tensor_set_requires_grad");
    need(ctx, moe_scale(ctx, x, 2.0f, &y), "moe_scale");
    if (y) need(ctx, moe_sum(ctx, y, &l), "moe_sum");
    need(ctx, moe_ctx_set_arena_limit(ctx, moe_ctx_arena_used(ctx) + 1024), "moe_ctx_set_arena_limit");
    s = moe_backward(ctx, l);     /* dy needs 4 KiB */
    moe_ctx_set_arena_limit(ctx, 0); /* for the still-works check */
    return s;
}

/* ============================================================================================
   The table
   ============================================================================================ */

typedef moe_status (*bi_fn)(moe_ctx *ctx);
typedef struct bi_case {
    const char *name;
    bi_fn fn;
    moe_status expect;
    const char *msg_has; /* the message must contain this (NULL: any non-empty message) */
    int null_ctx;        /* the call gets a NULL context: check moe_ctx_error(NULL) */
} bi_case;

#define E(fn, status, msg) {#fn, fn, status, msg, 0}
#define N(fn, status) {#fn, fn, status, NULL, 1}

static const bi_case g_cases[] = {
    N(null_out_ctx_new, MOE_ERR_ARG),
    N(null_ctx_set_threads, MOE_ERR_ARG),
    N(null_ctx_tensor_new, MOE_ERR_ARG),
    N(null_ctx_matmul, MOE_ERR_ARG),
    N(null_ctx_add, MOE_ERR_ARG),
    N(null_ctx_backward, MOE_ERR_ARG),
    N(null_ctx_gemm, MOE_ERR_ARG),
    N(null_ctx_fp8_quantize, MOE_ERR_ARG),

    E(set_threads_zero, MOE_ERR_ARG, "moe_ctx_set_threads"),
    E(set_threads_negative, MOE_ERR_ARG, "moe_ctx_set_threads"),
    E(set_threads_too_many, MOE_ERR_ARG, "moe_ctx_set_threads"),
    E(gemm_precision_i32, MOE_ERR_DTYPE, "moe_ctx_set_gemm_precision"),

    E(tensor_new_zero_dim, MOE_ERR_SHAPE, "moe_tensor_new"),
    E(tensor_new_negative_dim, MOE_ERR_SHAPE, "moe_tensor_new"),
    E(tensor_new_ndim0, MOE_ERR_SHAPE, "moe_tensor_new"),
    E(tensor_new_ndim5, MOE_ERR_SHAPE, "moe_tensor_new"),
    E(tensor_new_size_overflow, MOE_ERR_MEMORY, "moe_tensor_new"),
    E(tensor_new_int64_wrap, MOE_ERR_MEMORY, "moe_tensor_new"),
    E(tensor_new_1pib, MOE_ERR_MEMORY, "moe_tensor_new"),
    E(tensor_new_dtype_count, MOE_ERR_DTYPE, "moe_tensor_new"),
    E(tensor_new_dtype_7, MOE_ERR_DTYPE, "moe_tensor_new"),
#ifndef __cplusplus
    E(tensor_new_dtype_negative, MOE_ERR_DTYPE, "moe_tensor_new"),
    E(tensor_new_dtype_1000, MOE_ERR_DTYPE, "moe_tensor_new"),
#endif
    E(tensor_new_null_shape, MOE_ERR_ARG, "moe_tensor_new"),
    E(tensor_new_null_out, MOE_ERR_ARG, "moe_tensor_new"),
    E(tensor_temp_arena_limit, MOE_ERR_MEMORY, "arena"),
    E(view_out_of_bounds, MOE_ERR_SHAPE, "moe_tensor_view"),
    E(view_negative_offset, MOE_ERR_SHAPE, "moe_tensor_view"),
    E(view_offset_past_end, MOE_ERR_SHAPE, "moe_tensor_view"),
    E(view_ndim5, MOE_ERR_SHAPE, "moe_tensor_view"),
    E(view_null_out, MOE_ERR_ARG, "moe_tensor_view"),
    E(requires_grad_i32, MOE_ERR_DTYPE, "moe_tensor_set_requires_grad"),
    E(requires_grad_bf16, MOE_ERR_DTYPE, "moe_tensor_set_requires_grad"),
    E(requires_grad_op_output, MOE_ERR_ARG, "moe_tensor_set_requires_grad"),
    E(requires_grad_null, MOE_ERR_ARG, "moe_tensor_set_requires_grad"),
    E(copy_size_mismatch, MOE_ERR_SHAPE, "moe_tensor_copy"),
    E(copy_null_src, MOE_ERR_ARG, "moe_tensor_copy"),
    E(fill_null, MOE_ERR_ARG, "moe_tensor_fill"),
    E(fill_normal_i32, MOE_ERR_DTYPE, "moe_tensor_fill_normal"),
    E(fill_normal_negative_std, MOE_ERR_ARG, "moe_tensor_fill_normal"),
    E(fill_normal_nan_mean, MOE_ERR_ARG, "moe_tensor_fill_normal"),
    E(fill_normal_inf_std, MOE_ERR_ARG, "moe_tensor_fill_normal"),
    E(fill_normal_null_rng, MOE_ERR_ARG, "moe_tensor_fill_normal"),

    E(fp8_tiles_block0, MOE_ERR_ARG, "moe_fp8_quantize_tiles"),
    E(fp8_tiles_negative_block, MOE_ERR_ARG, "moe_fp8_quantize_tiles"),
    E(fp8_tiles_negative_rows, MOE_ERR_SHAPE, "moe_fp8_quantize_tiles"),
    E(fp8_tiles_null_x, MOE_ERR_ARG, "moe_fp8_quantize_tiles"),
    E(fp8_tiles_null_q, MOE_ERR_ARG, "moe_fp8_quantize_tiles"),
    E(fp8_blocks_null_scales, MOE_ERR_ARG, "moe_fp8_quantize_blocks"),
    E(fp8_blocks_negative_cols, MOE_ERR_SHAPE, "moe_fp8_quantize_blocks"),
    E(fp8_dequant_tiles_block0, MOE_ERR_ARG, "moe_fp8_dequantize_tiles"),
    E(fp8_dequant_blocks_null_out, MOE_ERR_ARG, "moe_fp8_dequantize_blocks"),

    E(gemm_null_args, MOE_ERR_ARG, "moe_gemm"),
    E(gemm_negative_m, MOE_ERR_SHAPE, "moe_gemm"),
    E(gemm_negative_k, MOE_ERR_SHAPE, "moe_gemm"),
    E(gemm_i32_a, MOE_ERR_DTYPE, "moe_gemm"),
    E(gemm_fp8_b, MOE_ERR_DTYPE, "moe_gemm"),
    E(gemm_compute_f16, MOE_ERR_DTYPE, "moe_gemm"),
    E(gemm_null_a, MOE_ERR_ARG, "moe_gemm"),
    E(gemm_null_b, MOE_ERR_ARG, "moe_gemm"),
    E(gemm_null_c, MOE_ERR_ARG, "moe_gemm"),
    E(gemm_small_lda, MOE_ERR_SHAPE, "moe_gemm"),
    E(gemm_small_ldc, MOE_ERR_SHAPE, "moe_gemm"),

    E(matmul_inner_dim, MOE_ERR_SHAPE, "moe_matmul"),
    E(matmul_batched_count, MOE_ERR_SHAPE, "moe_matmul"),
    E(matmul_w_1d, MOE_ERR_SHAPE, "moe_matmul"),
    E(matmul_i32_x, MOE_ERR_DTYPE, "moe_matmul"),
    E(matmul_bf16_w, MOE_ERR_DTYPE, "moe_matmul"),
    E(matmul_null_w, MOE_ERR_ARG, "moe_matmul"),
    E(matmul_null_out, MOE_ERR_ARG, "moe_matmul"),
    E(matmul_arena_limit, MOE_ERR_MEMORY, "arena"),
    E(add_shape, MOE_ERR_SHAPE, "moe_add"),
    E(add_bad_broadcast, MOE_ERR_SHAPE, "moe_add"),
    E(add_null_a, MOE_ERR_ARG, "moe_add"),
    E(add_null_out, MOE_ERR_ARG, "moe_add"),
    E(mul_shape, MOE_ERR_SHAPE, "moe_mul"),
    E(mul_bf16, MOE_ERR_DTYPE, "moe_mul"),
    E(scale_nan, MOE_ERR_NUMERIC, "moe_scale"),
    E(scale_inf, MOE_ERR_NUMERIC, "moe_scale"),
    E(scale_null_out, MOE_ERR_ARG, "moe_scale"),
    E(sum_null_x, MOE_ERR_ARG, "moe_sum"),
    E(sum_i32, MOE_ERR_DTYPE, "moe_sum"),
    E(silu_null_out, MOE_ERR_ARG, "moe_silu"),
    E(silu_f16, MOE_ERR_DTYPE, "moe_silu"),
    E(swiglu_shape, MOE_ERR_SHAPE, "moe_swiglu"),
    E(swiglu_null_up, MOE_ERR_ARG, "moe_swiglu"),
    E(softmax_i32, MOE_ERR_DTYPE, "moe_softmax"),
    E(softmax_null_out, MOE_ERR_ARG, "moe_softmax"),

    E(rmsnorm_weight_size, MOE_ERR_SHAPE, "moe_rmsnorm"),
    E(rmsnorm_weight_2d, MOE_ERR_SHAPE, "moe_rmsnorm"),
    E(rmsnorm_bf16_x, MOE_ERR_DTYPE, "moe_rmsnorm"),
    E(rmsnorm_eps_zero, MOE_ERR_ARG, "moe_rmsnorm"),
    E(rmsnorm_null_w, MOE_ERR_ARG, "moe_rmsnorm"),

    E(rope_table_odd_dim, MOE_ERR_SHAPE, "moe_rope_table_init"),
    E(rope_table_zero_dim, MOE_ERR_SHAPE, "moe_rope_table_init"),
    E(rope_table_huge_dim, MOE_ERR_SHAPE, "moe_rope_table_init"),
    E(rope_table_max_pos0, MOE_ERR_SHAPE, "moe_rope_table_init"),
    E(rope_table_theta1, MOE_ERR_CONFIG, "moe_rope_table_init"),
    E(rope_table_null, MOE_ERR_ARG, "moe_rope_table_init"),
    E(rope_table_dim_mismatch, MOE_ERR_SHAPE, "moe_rope"),
    E(rope_beyond_max_pos, MOE_ERR_SHAPE, "moe_rope"),
    E(rope_t_beyond_max_pos, MOE_ERR_SHAPE, "moe_rope"),
    E(rope_negative_pos, MOE_ERR_SHAPE, "moe_rope"),
    E(rope_x_2d, MOE_ERR_SHAPE, "moe_rope"),
    E(rope_null_table, MOE_ERR_ARG, "moe_rope"),
    E(rope_uninit_table, MOE_ERR_ARG, "moe_rope"),
#ifndef __cplusplus
    E(rope_bad_layout, MOE_ERR_ARG, "moe_rope"),
#endif

    E(attention_qk_dim, MOE_ERR_SHAPE, "moe_attention"),
    E(attention_k_time, MOE_ERR_SHAPE, "moe_attention"),
    E(attention_v_heads, MOE_ERR_SHAPE, "moe_attention"),
    E(attention_v_ndim, MOE_ERR_SHAPE, "moe_attention"),
    E(attention_2d, MOE_ERR_SHAPE, "moe_attention"),
    E(attention_scale_zero, MOE_ERR_ARG, "moe_attention"),
    E(attention_scale_negative, MOE_ERR_ARG, "moe_attention"),
    E(attention_null_v, MOE_ERR_ARG, "moe_attention"),
    E(attention_null_out, MOE_ERR_ARG, "moe_attention"),

    E(embedding_f32_ids, MOE_ERR_DTYPE, "moe_embedding"),
    E(embedding_id_negative, MOE_ERR_ARG, "moe_embedding"),
    E(embedding_id_eq_V, MOE_ERR_ARG, "moe_embedding"),
    E(embedding_table_3d, MOE_ERR_SHAPE, "moe_embedding"),
    E(embedding_ids_4d, MOE_ERR_SHAPE, "moe_embedding"),
    E(embedding_null_ids, MOE_ERR_ARG, "moe_embedding"),
    E(xent_targets_count, MOE_ERR_SHAPE, "moe_cross_entropy"),
    E(xent_target_eq_V, MOE_ERR_ARG, "moe_cross_entropy"),
    E(xent_target_negative, MOE_ERR_ARG, "moe_cross_entropy"),
    E(xent_f32_targets, MOE_ERR_DTYPE, "moe_cross_entropy"),
    E(xent_null_loss, MOE_ERR_ARG, "moe_cross_entropy"),

    E(topk_k0, MOE_ERR_ARG, "moe_topk"),
    E(topk_k_negative, MOE_ERR_ARG, "moe_topk"),
    E(topk_k_gt_n, MOE_ERR_ARG, "moe_topk"),
    E(topk_null_indices, MOE_ERR_ARG, "moe_topk"),
    E(gather_index_eq_N, MOE_ERR_ARG, "moe_gather"),
    E(gather_index_negative, MOE_ERR_ARG, "moe_gather"),
    E(gather_idx_2d, MOE_ERR_SHAPE, "moe_gather"),
    E(gather_f32_idx, MOE_ERR_DTYPE, "moe_gather"),
    E(scatter_add_nrows0, MOE_ERR_SHAPE, "moe_scatter_add"),
    E(scatter_add_nrows_negative, MOE_ERR_SHAPE, "moe_scatter_add"),
    E(scatter_add_index_eq_nrows, MOE_ERR_ARG, "moe_scatter_add"),
    E(scatter_add_idx_len, MOE_ERR_SHAPE, "moe_scatter_add"),

    E(concat_dim_too_big, MOE_ERR_ARG, "moe_concat"),
    E(concat_dim_negative, MOE_ERR_ARG, "moe_concat"),
    E(concat_other_dim_differs, MOE_ERR_SHAPE, "moe_concat"),
    E(concat_ndim_differs, MOE_ERR_SHAPE, "moe_concat"),
    E(concat_null_b, MOE_ERR_ARG, "moe_concat"),
    E(split_size0_zero, MOE_ERR_SHAPE, "moe_split"),
    E(split_size0_eq_dim, MOE_ERR_SHAPE, "moe_split"),
    E(split_size0_gt_dim, MOE_ERR_SHAPE, "moe_split"),
    E(split_dim_out_of_range, MOE_ERR_ARG, "moe_split"),
    E(split_null_b, MOE_ERR_ARG, "moe_split"),

    E(backward_non_scalar, MOE_ERR_SHAPE, "moe_backward"),
    E(backward_twice, MOE_ERR_STATE, "moe_backward"),
    E(backward_nan_loss, MOE_ERR_NUMERIC, "moe_backward"),
    E(backward_inf_loss, MOE_ERR_NUMERIC, "moe_backward"),
    E(backward_nothing_requires_grad, MOE_ERR_STATE, "moe_backward"),
    E(backward_recording_off, MOE_ERR_STATE, "moe_backward"),
    E(backward_null_loss, MOE_ERR_ARG, "moe_backward"),
    E(backward_arena_limit, MOE_ERR_MEMORY, "arena"),
};
#define BI_NCASES ((int)(sizeof g_cases / sizeof g_cases[0]))

/* ============================================================================================
   The checks
   ============================================================================================ */

/* The context still works: y = a + b (broadcast), l = sum(y), backward → da = 1. */
static void check_ctx_still_works(moe_ctx *ctx) {
    int64_t s23[2] = {2, 3}, s3[1] = {3};
    moe_tensor *a = NULL, *b = NULL, *y = NULL, *l = NULL;
    moe_status s;
    int i;
    s = moe_tensor_new(ctx, MOE_F32, 2, s23, &a);
    T_CHECK(s == MOE_OK, "after the failure, moe_tensor_new gives %s: %s", moe_status_name(s), moe_ctx_error(ctx));
    s = moe_tensor_new(ctx, MOE_F32, 1, s3, &b);
    T_CHECK(s == MOE_OK, "after the failure, moe_tensor_new gives %s: %s", moe_status_name(s), moe_ctx_error(ctx));
    if (!a || !b) goto done;
    for (i = 0; i < 6; i++) moe_tensor_set(a, i, i + 1);
    for (i = 0; i < 3; i++) moe_tensor_set(b, i, 10 * (i + 1));
    s = moe_tensor_set_requires_grad(ctx, a, 1);
    T_CHECK(s == MOE_OK, "after the failure, moe_tensor_set_requires_grad gives %s: %s", moe_status_name(s),
            moe_ctx_error(ctx));
    s = moe_add(ctx, a, b, &y);
    T_CHECK(s == MOE_OK, "after the failure, moe_add gives %s: %s", moe_status_name(s), moe_ctx_error(ctx));
    if (s != MOE_OK) goto done;
    s = moe_sum(ctx, y, &l);
    T_CHECK(s == MOE_OK, "after the failure, moe_sum gives %s: %s", moe_status_name(s), moe_ctx_error(ctx));
    if (s != MOE_OK) goto done;
    T_CHECK(moe_tensor_get(l, 0) == 141.0, "after the failure, sum(a + b) = %g, want 141", moe_tensor_get(l, 0));
    s = moe_backward(ctx, l);
    T_CHECK(s == MOE_OK, "after the failure, moe_backward gives %s: %s", moe_status_name(s), moe_ctx_error(ctx));
    if (s == MOE_OK && a->grad)
        for (i = 0; i < 6; i++)
            T_CHECK(moe_tensor_get(a->grad, i) == 1.0, "after the failure, da[%d] = %g, want 1", i,
                    moe_tensor_get(a->grad, i));
done:
    moe_tensor_free(ctx, a);
    moe_tensor_free(ctx, b);
}

static void free_case_resources(moe_ctx *ctx) {
    int i;
    for (i = 0; i < g_npool; i++) moe_tensor_free(ctx, g_pool[i]);
    for (i = 0; i < g_ntabs; i++) moe_rope_table_free(&g_tabs[i]);
    g_npool = 0;
    g_ntabs = 0;
}

static int g_current;

static void run_table_case(void) {
    const bi_case *c = &g_cases[g_current];
    moe_ctx *ctx = NULL;
    moe_status s, got;
    const char *msg;
    g_npool = 0;
    g_ntabs = 0;
    g_setup_err[0] = 0;
    memset(g_tabs, 0, sizeof g_tabs);
    s = moe_ctx_new(&ctx);
    T_ASSERT(s == MOE_OK && ctx, "moe_ctx_new gives %s", moe_status_name(s));

    got = c->fn(ctx);

    T_CHECK(!g_setup_err[0], "%s", g_setup_err);
    T_CHECK(c->expect != MOE_OK, "the table expects MOE_OK");
    T_CHECK(got == c->expect, "status %s, want %s", moe_status_name(got), moe_status_name(c->expect));
    msg = moe_ctx_error(c->null_ctx ? NULL : ctx);
    T_CHECK(msg && msg[0], "moe_ctx_error is empty after %s", moe_status_name(got));
    if (msg && msg[0]) {
        T_NOTE("%s: \"%s\"", moe_status_name(got), msg);
        if (c->msg_has)
            T_CHECK(strstr(msg, c->msg_has) != NULL, "message does not mention \"%s\"", c->msg_has);
    }
    if (c->null_ctx)
        T_CHECK(moe_ctx_error(ctx)[0] == 0, "a call with a NULL context wrote into another context: \"%s\"",
                moe_ctx_error(ctx));

    check_ctx_still_works(ctx);
    free_case_resources(ctx);
    moe_ctx_free(ctx);
}

/* Inputs just inside the limits are accepted (the bad-input checks are not too eager). */
static void run_edges_accepted(void) {
    moe_ctx *ctx = NULL;
    moe_tensor *lg, *t, *x, *v = NULL, *ix = NULL, *l = NULL, *y = NULL, *a = NULL, *b = NULL;
    moe_rope_table *tab;
    moe_status s;
    int64_t one = 1;
    g_npool = 0;
    g_ntabs = 0;
    g_setup_err[0] = 0;
    memset(g_tabs, 0, sizeof g_tabs);
    T_ASSERT(moe_ctx_new(&ctx) == MOE_OK, "moe_ctx_new failed");

    lg = F2(3, 5);
    t = I1(3);
    seti(t, 0, -100);
    seti(t, 1, 4);
    s = moe_cross_entropy(ctx, lg, t, -100, &l); /* ignore_index is not out of range */
    T_CHECK(s == MOE_OK, "cross_entropy with ignore_index -100: %s (%s)", moe_status_name(s), moe_ctx_error(ctx));
    seti(t, 1, -100);
    seti(t, 2, -100);
    s = moe_cross_entropy(ctx, lg, t, -100, &l); /* every row ignored */
    T_CHECK(s == MOE_OK, "cross_entropy with every row ignored: %s (%s)", moe_status_name(s), moe_ctx_error(ctx));

    x = F2(2, 6);
    s = moe_topk(ctx, x, 6, &v, &ix);
    T_CHECK(s == MOE_OK, "topk k == n: %s (%s)", moe_status_name(s), moe_ctx_error(ctx));
    s = moe_split(ctx, x, 1, 5, &a, &b);
    T_CHECK(s == MOE_OK, "split size0 = dim - 1: %s (%s)", moe_status_name(s), moe_ctx_error(ctx));

    tab = mk_rope(ctx, 8, 16);
    s = moe_rope(ctx, F3(4, 2, 8), tab, 12, MOE_ROPE_PAIRS, &y); /* positions 12..15 */
    T_CHECK(s == MOE_OK, "rope on the last positions: %s (%s)", moe_status_name(s), moe_ctx_error(ctx));

    {
        moe_tensor *src = F2(2, 3), *idx = I1(2);
        seti(idx, 0, 4);
        s = moe_scatter_add(ctx, src, idx, 5, &y);
        T_CHECK(s == MOE_OK, "scatter_add to row n_rows - 1: %s (%s)", moe_status_name(s), moe_ctx_error(ctx));
        s = moe_embedding(ctx, F2(5, 2), idx, &y);
        T_CHECK(s == MOE_OK, "embedding id V - 1: %s (%s)", moe_status_name(s), moe_ctx_error(ctx));
    }
    {
        moe_tensor *big = F1(1);
        int64_t s1 = 1;
        s = moe_tensor_view(ctx, big, 1, &s1, 0, &y);
        T_CHECK(s == MOE_OK, "view of the whole tensor: %s (%s)", moe_status_name(s), moe_ctx_error(ctx));
    }
    {
        moe_gemm_args g = gemm_ok();
        g.m = 0; g.a = NULL; g.c = NULL;
        s = moe_gemm(ctx, &g);
        T_CHECK(s == MOE_OK, "gemm with m = 0 and NULL A, C: %s (%s)", moe_status_name(s), moe_ctx_error(ctx));
    }
    s = moe_fp8_quantize_tiles(ctx, g_fx, 0, 8, 4, g_fq, g_fs);
    T_CHECK(s == MOE_OK, "quantize 0 rows: %s (%s)", moe_status_name(s), moe_ctx_error(ctx));
    s = moe_ctx_set_threads(ctx, 1);
    T_CHECK(s == MOE_OK, "set_threads(1): %s (%s)", moe_status_name(s), moe_ctx_error(ctx));
    (void)one;
    T_CHECK(!g_setup_err[0], "%s", g_setup_err);
    free_case_resources(ctx);
    moe_ctx_free(ctx);
}

/* ---- isolation: run a case in a child so a crash, hang, sanitizer report or leak fails only it ---- */

#if BI_FORK
static int g_nofork;

static void run_isolated(void (*body)(void)) {
    int fds[2], st = 0;
    pid_t pid;
    if (g_nofork) { body(); return; }
    fflush(stdout);
    fflush(stderr);
    if (pipe(fds) != 0) { body(); return; }
    pid = fork();
    if (pid < 0) {
        close(fds[0]);
        close(fds[1]);
        body();
        return;
    }
    if (pid == 0) {
        size_t len, off = 0;
        close(fds[0]);
        alarm(60);
        t_notes[0] = 0;
        t_case_failures = 0;
        body();
        len = strlen(t_notes);
        while (off < len) {
            ssize_t w = write(fds[1], t_notes + off, len - off);
            if (w <= 0) break;
            off += (size_t)w;
        }
        close(fds[1]);
        exit(t_case_failures ? 42 : 0); /* exit, not _exit: LeakSanitizer checks this child */
    }
    close(fds[1]);
    for (;;) {
        size_t used = strlen(t_notes);
        ssize_t r;
        if (used + 1 >= sizeof t_notes) {
            char sink[256];
            if (read(fds[0], sink, sizeof sink) <= 0) break;
            continue;
        }
        r = read(fds[0], t_notes + used, sizeof t_notes - 1 - used);
        if (r <= 0) break;
        t_notes[used + (size_t)r] = 0;
    }
    close(fds[0]);
    while (waitpid(pid, &st, 0) < 0) {}
    if (WIFSIGNALED(st)) {
        T_CHECK(0, "the case crashed: signal %d%s", WTERMSIG(st), WTERMSIG(st) == SIGALRM ? " (timed out)" : "");
    } else if (WIFEXITED(st) && WEXITSTATUS(st) == 42) {
        t_case_failures++; /* its failures are in the notes */
    } else if (WIFEXITED(st) && WEXITSTATUS(st) != 0) {
        T_CHECK(0, "the case exited with status %d (sanitizer error or leak: see stderr)", WEXITSTATUS(st));
    }
}
#else
static void run_isolated(void (*body)(void)) { body(); }
#endif

static void run_current_isolated(void) { run_isolated(run_table_case); }
static void edges_accepted(void) { run_isolated(run_edges_accepted); }

int main(int argc, char **argv) {
    int i;
    t_filter = argc > 1 ? argv[1] : NULL;
#if BI_FORK
    g_nofork = getenv("MOE_TEST_NOFORK") != NULL;
#endif
    for (i = 0; i < 64; i++) g_fx[i] = 0.5f * (float)(i % 9) - 2.0f;
    printf("%d bad-input cases\n", BI_NCASES);
    for (i = 0; i < BI_NCASES; i++) {
        if (t_filter && !strstr(g_cases[i].name, t_filter)) continue;
        g_current = i;
        t__run(g_cases[i].name, run_current_isolated);
    }
    T_RUN_FILTERED(edges_accepted);
    return t_summary();
}
