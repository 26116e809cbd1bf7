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
/* The safetensors and Hugging Face cases write files and directories under build/. */
#if defined(__unix__) || defined(__APPLE__)
#define BI_POSIX 1
#include <sys/stat.h>
#include <unistd.h>
#else
#define BI_POSIX 0
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

/* ---- safetensors: hostile files, built in memory (and a few written under build/) ----
   Each case builds one image with one thing wrong and opens it; a file that opens anyway
   is closed, so the leak check stays meaningful either way. */

static void bi_flag(const char *what) {
    if (!g_setup_err[0]) snprintf(g_setup_err, sizeof g_setup_err, "%s", what);
}
static long bi_pid(void) {
#if BI_POSIX
    return (long)getpid();
#else
    return 0;
#endif
}
static void put_u64le(unsigned char *p, uint64_t v) {
    int b;
    for (b = 0; b < 8; b++) p[b] = (unsigned char)(v >> (8 * b));
}

/* The 8-byte length hlen, the header text, then data_len data bytes (1, 2, 3, ...). malloc'd. */
static unsigned char *st_image(const char *header, size_t header_len, uint64_t hlen, size_t data_len, size_t *len) {
    size_t i;
    unsigned char *p;
    *len = 8 + header_len + data_len;
    p = (unsigned char *)malloc(*len);
    if (!p) {
        bi_flag("out of memory building a safetensors image");
        return NULL;
    }
    put_u64le(p, hlen);
    if (header_len) memcpy(p + 8, header, header_len);
    for (i = 0; i < data_len; i++) p[8 + header_len + i] = (unsigned char)(i + 1);
    return p;
}

/* moe_st_open_memory on bytes; on failure *out must stay NULL. */
static moe_status st_try_memory(moe_ctx *ctx, const void *bytes, size_t len) {
    moe_st_file *f = NULL;
    moe_status s = moe_st_open_memory(ctx, bytes, len, &f);
    if (s != MOE_OK && f) bi_flag("moe_st_open_memory failed but left *out non-NULL");
    if (s == MOE_OK) moe_st_close(f);
    return s;
}

/* The same bytes written to build/bi_st_<pid>.safetensors and read back with moe_st_open. */
static moe_status st_try_file(moe_ctx *ctx, const void *bytes, size_t len) {
    char path[256];
    FILE *fp;
    moe_st_file *f = NULL;
    moe_status s;
    snprintf(path, sizeof path, "build/bi_st_%ld.safetensors", bi_pid());
    fp = fopen(path, "wb");
    if (!fp || (len && fwrite(bytes, 1, len, fp) != len)) {
        if (fp) fclose(fp);
        remove(path);
        bi_flag("cannot write a file under build/ (run from the repository root)");
        return MOE_ERR_IO;
    }
    fclose(fp);
    s = moe_st_open(ctx, path, &f);
    if (s != MOE_OK && f) bi_flag("moe_st_open failed but left *out non-NULL");
    if (s == MOE_OK) moe_st_close(f);
    remove(path);
    return s;
}

/* A header (its true length) and data_len data bytes, from memory or from a file. */
static moe_status st_hdr(moe_ctx *ctx, const char *header, size_t data_len, int from_file) {
    size_t len;
    moe_status s;
    unsigned char *img = st_image(header, strlen(header), strlen(header), data_len, &len);
    if (!img) return MOE_ERR_MEMORY;
    s = from_file ? st_try_file(ctx, img, len) : st_try_memory(ctx, img, len);
    free(img);
    return s;
}
#define ST_MEM(header, data_len) st_hdr(ctx, header, data_len, 0)
#define ST_FILE(header, data_len) st_hdr(ctx, header, data_len, 1)
/* One well-formed F32 [1] entry named a at bytes [0, 4). */
#define ST_A "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}"

/* A header length that disagrees with the file. */
static moe_status st_hlen(moe_ctx *ctx, uint64_t hlen) {
    size_t len;
    moe_status s;
    const char *h = "{" ST_A "}";
    unsigned char *img = st_image(h, strlen(h), hlen, 4, &len);
    if (!img) return MOE_ERR_MEMORY;
    s = st_try_memory(ctx, img, len);
    free(img);
    return s;
}

/* -- the file is too short or its header length is wrong -- */
CASE(st_mem_empty) { return st_try_memory(ctx, NULL, 0); }
CASE(st_mem_7_bytes) {
    static const unsigned char b[7] = {2, 0, 0, 0, 0, 0, 0};
    return st_try_memory(ctx, b, sizeof b);
}
CASE(st_file_empty) { return st_try_file(ctx, "", 0); }
CASE(st_file_5_bytes) { return st_try_file(ctx, "\x02\0\0\0\0", 5); }
CASE(st_header_cut_short) { /* the length says 52 header bytes, the file stops after 20 */
    size_t len;
    moe_status s;
    const char *h = "{" ST_A "}";
    unsigned char *img = st_image(h, strlen(h), strlen(h), 4, &len);
    if (!img) return MOE_ERR_MEMORY;
    s = st_try_memory(ctx, img, 8 + 20);
    free(img);
    return s;
}
CASE(st_file_header_cut_short) {
    size_t len;
    moe_status s;
    const char *h = "{" ST_A "}";
    unsigned char *img = st_image(h, strlen(h), strlen(h), 4, &len);
    if (!img) return MOE_ERR_MEMORY;
    s = st_try_file(ctx, img, 8 + strlen(h) - 1);
    free(img);
    return s;
}
CASE(st_header_len_one_past_file) { return st_hlen(ctx, strlen("{" ST_A "}") + 4 + 1); }
CASE(st_header_len_2_63) { return st_hlen(ctx, (uint64_t)1 << 63); }
CASE(st_header_len_all_ones) { return st_hlen(ctx, ~(uint64_t)0); }
CASE(st_header_len_zero) { return st_hlen(ctx, 0); } /* an empty header is not JSON */
CASE(st_header_over_100mb) { /* a valid "{}" padded with spaces to 100 MiB + 8: only the limit refuses it */
    size_t hl = ((size_t)100 << 20) + 8, len = 8 + hl;
    unsigned char *img = (unsigned char *)malloc(len);
    moe_status s;
    if (!img) {
        bi_flag("out of memory building a 100 MB image");
        return MOE_ERR_MEMORY;
    }
    put_u64le(img, hl);
    memset(img + 8, ' ', hl);
    img[8] = '{';
    img[9] = '}';
    s = st_try_memory(ctx, img, len);
    free(img);
    return s;
}

/* -- the header is not valid JSON -- */
CASE(st_json_unterminated_string) { return ST_MEM("{\"a\":{\"dtype\":\"F32}}", 4); }
CASE(st_json_trailing_comma_object) { return ST_MEM("{" ST_A ",}", 4); }
CASE(st_json_trailing_comma_array) {
    return ST_MEM("{\"a\":{\"dtype\":\"F32\",\"shape\":[1,],\"data_offsets\":[0,4]}}", 4);
}
CASE(st_json_bad_escape) { return ST_MEM("{\"a\\x41\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4); }
CASE(st_json_bad_unicode_escape) { return ST_MEM("{\"\\u12G4\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4); }
CASE(st_json_bare_word) { return ST_MEM("{\"a\":{\"dtype\":F32,\"shape\":[1],\"data_offsets\":[0,4]}}", 4); }
CASE(st_json_unquoted_key) { return ST_MEM("{a:{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4); }
CASE(st_json_single_quotes) { return ST_MEM("{'a':{'dtype':'F32','shape':[1],'data_offsets':[0,4]}}", 4); }
CASE(st_json_leading_zero) { return ST_MEM("{\"a\":{\"dtype\":\"F32\",\"shape\":[01],\"data_offsets\":[0,4]}}", 4); }
CASE(st_json_raw_newline_in_string) { return ST_MEM("{\"a\nb\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4); }
CASE(st_json_text_after_object) { return ST_MEM("{" ST_A "} {}", 4); }
CASE(st_json_nul_byte) { /* a NUL inside the header, where a JSON reader on C strings would stop */
    static const char h[] = "{" ST_A "}\0 ";
    size_t len;
    moe_status s;
    unsigned char *img = st_image(h, sizeof h - 1, sizeof h - 1, 4, &len);
    if (!img) return MOE_ERR_MEMORY;
    s = st_try_memory(ctx, img, len);
    free(img);
    return s;
}
CASE(st_json_deep_nesting) { /* {"a": [[[[...10000...]]]]} */
    size_t n = 10000, i, hl = 6 + 2 * n + 1, len;
    char *h = (char *)malloc(hl + 1);
    unsigned char *img;
    moe_status s;
    if (!h) return MOE_ERR_MEMORY;
    memcpy(h, "{\"a\":", 5);
    for (i = 0; i < n; i++) h[5 + i] = '[';
    for (i = 0; i < n; i++) h[5 + n + i] = ']';
    h[5 + 2 * n] = '}';
    h[6 + 2 * n] = 0;
    img = st_image(h, strlen(h), strlen(h), 0, &len);
    free(h);
    if (!img) return MOE_ERR_MEMORY;
    s = st_try_memory(ctx, img, len);
    free(img);
    return s;
}
CASE(st_file_invalid_json) { return ST_FILE("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}", 4); }

/* -- valid JSON, not a valid header -- */
CASE(st_header_array) { return ST_MEM("[]", 0); }
CASE(st_header_string) { return ST_MEM("\"F32\"", 0); }
CASE(st_header_null) { return ST_MEM("null", 0); }
CASE(st_entry_array) { return ST_MEM("{\"a\":[0,4]}", 4); }
CASE(st_entry_string) { return ST_MEM("{\"a\":\"F32\"}", 4); }
CASE(st_missing_dtype) { return ST_MEM("{\"a\":{\"shape\":[1],\"data_offsets\":[0,4]}}", 4); }
CASE(st_missing_shape) { return ST_MEM("{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", 4); }
CASE(st_missing_data_offsets) { return ST_MEM("{\"a\":{\"dtype\":\"F32\",\"shape\":[1]}}", 4); }
CASE(st_dtype_not_string) { return ST_MEM("{\"a\":{\"dtype\":4,\"shape\":[1],\"data_offsets\":[0,4]}}", 4); }
CASE(st_shape_not_array) { return ST_MEM("{\"a\":{\"dtype\":\"F32\",\"shape\":1,\"data_offsets\":[0,4]}}", 4); }
CASE(st_data_offsets_three) { return ST_MEM("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4,8]}}", 8); }
CASE(st_dtype_unknown) { return ST_MEM("{\"a\":{\"dtype\":\"Q4_K\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4); }
CASE(st_dtype_lowercase) { return ST_MEM("{\"a\":{\"dtype\":\"f32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4); }
CASE(st_shape_negative_dim) { return ST_MEM("{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 4); }
CASE(st_shape_fractional_dim) { return ST_MEM("{\"a\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,4]}}", 4); }
CASE(st_shape_string_dim) { return ST_MEM("{\"a\":{\"dtype\":\"F32\",\"shape\":[\"1\"],\"data_offsets\":[0,4]}}", 4); }
CASE(st_shape_1e300_dim) { return ST_MEM("{\"a\":{\"dtype\":\"F32\",\"shape\":[1e300],\"data_offsets\":[0,4]}}", 4); }
CASE(st_shape_numel_overflow) { /* 2^32 · 2^32 · 2^32 elements: wraps a 64-bit count to 0 */
    return ST_MEM("{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,4294967296],\"data_offsets\":[0,0]}}", 0);
}
CASE(st_shape_bytes_overflow) { /* 2^62 BF16 elements = 2^63 bytes */
    return ST_MEM("{\"a\":{\"dtype\":\"BF16\",\"shape\":[2147483648,2147483648],\"data_offsets\":[0,4]}}", 4);
}
CASE(st_shape_9_dims) { return ST_MEM("{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}", 4); }
CASE(st_offsets_reversed) { return ST_MEM("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,0]}}", 4); }
CASE(st_offsets_negative) { return ST_MEM("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}}", 4); }
CASE(st_offsets_fractional) { return ST_MEM("{\"a\":{\"dtype\":\"I32\",\"shape\":[1],\"data_offsets\":[0.5,4.5]}}", 5); }
CASE(st_offsets_beyond_data) { return ST_MEM("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 4); }
CASE(st_offsets_huge) { return ST_MEM("{\"a\":{\"dtype\":\"I64\",\"shape\":[1],\"data_offsets\":[18446744073709551608,18446744073709551616]}}", 8); }
CASE(st_bytes_mismatch) { return ST_MEM("{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 8); }
CASE(st_bytes_mismatch_bf16) { return ST_MEM("{\"a\":{\"dtype\":\"BF16\",\"shape\":[3],\"data_offsets\":[0,4]}}", 4); }
CASE(st_tensors_overlap) {
    return ST_MEM("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                  "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12);
}
CASE(st_tensors_same_range) {
    return ST_MEM("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                  "\"b\":{\"dtype\":\"I32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4);
}
CASE(st_tensors_gap) {
    return ST_MEM("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                  "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}", 12);
}
CASE(st_gap_at_start) { return ST_MEM("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8); }
CASE(st_data_left_over) { return ST_MEM("{" ST_A "}", 8); }
CASE(st_file_data_left_over) { return ST_FILE("{" ST_A "}", 5); }
CASE(st_data_without_tensors) { return ST_MEM("{}", 16); }
CASE(st_duplicate_name) {
    return ST_MEM("{" ST_A ",\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8);
}
CASE(st_duplicate_name_escaped) { /* "\u0061" is "a" */
    return ST_MEM("{" ST_A ",\"\\u0061\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8);
}
CASE(st_name_with_nul_escape) { /* "a\u0000b" decodes to a name with a NUL: must not alias "a" */
    return ST_MEM("{" ST_A ",\"a\\u0000b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8);
}
CASE(st_name_too_long) {
    char h[1024];
    char name[601];
    memset(name, 'n', 600);
    name[600] = 0;
    snprintf(h, sizeof h, "{\"%s\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", name);
    return ST_MEM(h, 4);
}
CASE(st_metadata_number_value) { return ST_MEM("{\"__metadata__\":{\"format\":\"pt\",\"step\":7}," ST_A "}", 4); }
CASE(st_metadata_object_value) { return ST_MEM("{\"__metadata__\":{\"x\":{\"y\":\"z\"}}," ST_A "}", 4); }
CASE(st_metadata_not_object) { return ST_MEM("{\"__metadata__\":\"pt\"," ST_A "}", 4); }

/* -- wrong arguments -- */
CASE(st_open_null_out) { return moe_st_open(ctx, "build/whatever.safetensors", NULL); }
/* volatile: with a literal NULL, gcc -O3 inlines moe_st_open and warns (-Wformat-overflow) about
   a '%s' of NULL on a path it cannot tell is dead */
static const char *volatile g_null_path = NULL;
CASE(st_open_null_path) {
    moe_st_file *f = NULL;
    moe_status s = moe_st_open(ctx, g_null_path, &f);
    moe_st_close(f);
    return s;
}
CASE(st_open_missing_file) {
    moe_st_file *f = NULL;
    moe_status s = moe_st_open(ctx, "build/bi_no_such_file.safetensors", &f);
    moe_st_close(f);
    return s;
}
CASE(st_open_memory_null_bytes) { return st_try_memory(ctx, NULL, 16); }
CASE(st_open_memory_null_out) {
    static const unsigned char b[8] = {0};
    return moe_st_open_memory(ctx, b, sizeof b, NULL);
}

/* -- the writer -- */
static float g_wdata[16];
static moe_status st_writer_one(moe_ctx *ctx, const char *name, moe_st_dtype dt, int ndim, const int64_t *shape) {
    moe_st_writer *w = NULL;
    moe_status s;
    need(ctx, moe_st_writer_new(ctx, &w), "moe_st_writer_new");
    if (!w) return MOE_ERR_MEMORY;
    s = moe_st_writer_add(ctx, w, name, dt, ndim, shape, g_wdata);
    moe_st_writer_free(w);
    return s;
}
CASE(st_writer_new_null_out) { return moe_st_writer_new(ctx, NULL); }
CASE(st_writer_add_null_writer) {
    int64_t s1 = 1;
    return moe_st_writer_add(ctx, NULL, "a", MOE_ST_F32, 1, &s1, g_wdata);
}
CASE(st_writer_add_null_name) {
    int64_t s1 = 1;
    return st_writer_one(ctx, NULL, MOE_ST_F32, 1, &s1);
}
CASE(st_writer_add_quote_in_name) {
    int64_t s1 = 1;
    return st_writer_one(ctx, "a\"b", MOE_ST_F32, 1, &s1);
}
CASE(st_writer_add_dtype_count) {
    int64_t s1 = 1;
    return st_writer_one(ctx, "a", MOE_ST_DTYPE_COUNT, 1, &s1);
}
CASE(st_writer_add_9_dims) {
    int64_t s9[9] = {1, 1, 1, 1, 1, 1, 1, 1, 1};
    return st_writer_one(ctx, "a", MOE_ST_F32, 9, s9);
}
CASE(st_writer_add_negative_dim) {
    int64_t s2[2] = {2, -2};
    return st_writer_one(ctx, "a", MOE_ST_F32, 2, s2);
}
CASE(st_writer_add_bytes_wrap) { /* 2^62 F32 elements = 2^64 bytes: wraps to 0 in size_t */
    int64_t s2[2] = {(int64_t)1 << 31, (int64_t)1 << 31};
    return st_writer_one(ctx, "a", MOE_ST_F32, 2, s2);
}
CASE(st_writer_add_bytes_over_half) { /* 2^61 + 1 F32 elements = 2^63 + 4 bytes */
    int64_t s1 = ((int64_t)1 << 61) + 1;
    return st_writer_one(ctx, "a", MOE_ST_F32, 1, &s1);
}
CASE(st_writer_add_duplicate_name) { /* the file would be refused by moe_st_open */
    moe_st_writer *w = NULL;
    int64_t s1 = 1;
    moe_status s;
    need(ctx, moe_st_writer_new(ctx, &w), "moe_st_writer_new");
    if (!w) return MOE_ERR_MEMORY;
    need(ctx, moe_st_writer_add(ctx, w, "a", MOE_ST_F32, 1, &s1, g_wdata), "moe_st_writer_add");
    s = moe_st_writer_add(ctx, w, "a", MOE_ST_F32, 1, &s1, g_wdata);
    moe_st_writer_free(w);
    return s;
}
CASE(st_writer_save_null_writer) { return moe_st_writer_save(ctx, NULL, "build/bi_never.safetensors"); }
CASE(st_writer_save_missing_dir) {
    moe_st_writer *w = NULL;
    int64_t s1 = 1;
    moe_status s;
    need(ctx, moe_st_writer_new(ctx, &w), "moe_st_writer_new");
    if (!w) return MOE_ERR_MEMORY;
    need(ctx, moe_st_writer_add(ctx, w, "a", MOE_ST_F32, 1, &s1, g_wdata), "moe_st_writer_add");
    s = moe_st_writer_save(ctx, w, "build/bi_no_such_dir/x.safetensors");
    moe_st_writer_free(w);
    return s;
}

/* ---- config.json: every field present is honoured or refused by name ----
   The small config below as JSON, with one key replaced (or added, or removed), parsed from
   memory. Explicit zeros and out-of-range numbers are refused, never replaced by defaults. */

static const char *const g_cfg_base[][2] = {
    {"vocab_size", "32"}, {"hidden_size", "16"}, {"intermediate_size", "32"}, {"moe_intermediate_size", "8"},
    {"num_hidden_layers", "2"}, {"first_k_dense_replace", "1"}, {"num_attention_heads", "2"}, {"num_key_value_heads", "2"},
    {"q_lora_rank", "8"}, {"kv_lora_rank", "8"}, {"qk_nope_head_dim", "4"}, {"qk_rope_head_dim", "4"}, {"v_head_dim", "4"},
    {"n_routed_experts", "4"}, {"n_shared_experts", "1"}, {"num_experts_per_tok", "2"}, {"n_group", "2"}, {"topk_group", "1"},
    {"norm_topk_prob", "true"}, {"routed_scaling_factor", "2.5"}, {"num_nextn_predict_layers", "1"},
    {"max_position_embeddings", "16"}, {"rope_theta", "10000"}, {"rms_norm_eps", "1e-6"}, {"rope_interleave", "true"},
    {"attention_bias", "false"}, {"hidden_act", "\"silu\""}, {"tie_word_embeddings", "false"},
    {"rope_scaling", "{\"type\": \"yarn\", \"factor\": 4, \"original_max_position_embeddings\": 4, \"mscale\": 1, \"mscale_all_dim\": 0.5}"}};

/* The base JSON with key = value (value NULL: key removed; a key not in the base is appended). */
static void cfg_json(char *buf, size_t size, const char *key, const char *value) {
    size_t i, o = 0;
    int done = 0;
    o += (size_t)snprintf(buf + o, size - o, "{");
    for (i = 0; i < sizeof g_cfg_base / sizeof g_cfg_base[0]; i++) {
        const char *v = g_cfg_base[i][1];
        if (key && strcmp(key, g_cfg_base[i][0]) == 0) {
            done = 1;
            if (!value) continue;
            v = value;
        }
        o += (size_t)snprintf(buf + o, size - o, "%s\"%s\": %s", o > 1 ? ", " : "", g_cfg_base[i][0], v);
    }
    if (key && !done && value) o += (size_t)snprintf(buf + o, size - o, ", \"%s\": %s", key, value);
    snprintf(buf + o, size - o, "}");
}
static moe_status cfg_try(moe_ctx *ctx, const char *key, const char *value) {
    char buf[4096];
    moe_config c;
    cfg_json(buf, sizeof buf, key, value);
    return moe_config_parse(ctx, buf, strlen(buf), &c);
}
static moe_status cfg_try_text(moe_ctx *ctx, const char *text) {
    moe_config c;
    return moe_config_parse(ctx, text, strlen(text), &c);
}
#define YARN(fields) "{\"type\": \"yarn\", \"factor\": 4, \"original_max_position_embeddings\": 4" fields "}"

CASE(cfg_experts_per_tok_zero) { return cfg_try(ctx, "num_experts_per_tok", "0"); }
CASE(cfg_rms_norm_eps_zero) { return cfg_try(ctx, "rms_norm_eps", "0"); }
CASE(cfg_rms_norm_eps_negative) { return cfg_try(ctx, "rms_norm_eps", "-1e-6"); }
CASE(cfg_rms_norm_eps_overflow) { return cfg_try(ctx, "rms_norm_eps", "1e400"); }
CASE(cfg_n_group_zero) { return cfg_try(ctx, "n_group", "0"); }
CASE(cfg_topk_group_zero) { return cfg_try(ctx, "topk_group", "0"); }
CASE(cfg_hidden_size_zero) { return cfg_try(ctx, "hidden_size", "0"); }
CASE(cfg_intermediate_size_zero) { return cfg_try(ctx, "intermediate_size", "0"); }
CASE(cfg_routed_scaling_zero) { return cfg_try(ctx, "routed_scaling_factor", "0"); }
CASE(cfg_initializer_range_zero) { return cfg_try(ctx, "initializer_range", "0"); }
CASE(cfg_q_lora_rank_zero) { return cfg_try(ctx, "q_lora_rank", "0"); }
CASE(cfg_q_lora_rank_1e300) { return cfg_try(ctx, "q_lora_rank", "1e300"); }
CASE(cfg_kv_heads_1e300) { return cfg_try(ctx, "num_key_value_heads", "1e300"); }
CASE(cfg_kv_heads_differ) { return cfg_try(ctx, "num_key_value_heads", "1"); }
CASE(cfg_vocab_negative) { return cfg_try(ctx, "vocab_size", "-32"); }
CASE(cfg_vocab_2_pow_64) { return cfg_try(ctx, "vocab_size", "18446744073709551616"); }
CASE(cfg_layers_fraction) { return cfg_try(ctx, "num_hidden_layers", "2.5"); }
CASE(cfg_layers_string) { return cfg_try(ctx, "num_hidden_layers", "\"2\""); }
CASE(cfg_layers_null) { return cfg_try(ctx, "num_hidden_layers", "null"); }
CASE(cfg_norm_topk_prob_number) { return cfg_try(ctx, "norm_topk_prob", "1"); }
CASE(cfg_rope_interleave_null) { return cfg_try(ctx, "rope_interleave", "null"); }
CASE(cfg_attention_bias_true) { return cfg_try(ctx, "attention_bias", "true"); }
CASE(cfg_mlp_bias_true) { return cfg_try(ctx, "mlp_bias", "true"); }
CASE(cfg_attention_dropout) { return cfg_try(ctx, "attention_dropout", "0.1"); }
CASE(cfg_moe_layer_freq_2) { return cfg_try(ctx, "moe_layer_freq", "2"); }
CASE(cfg_partial_rotary_factor) { return cfg_try(ctx, "partial_rotary_factor", "0.5"); }
CASE(cfg_hidden_act_gelu) { return cfg_try(ctx, "hidden_act", "\"gelu\""); }
CASE(cfg_mtp_alias_disagrees) { return cfg_try(ctx, "num_mtp_layers", "2"); }
CASE(cfg_duplicate_key) { return cfg_try(ctx, "hidden_size", "16, \"hidden_size\": 32"); }
CASE(cfg_duplicate_key_escaped) { return cfg_try(ctx, "hidden_size", "16, \"hidden\\u005fsize\": 32"); }
CASE(cfg_yarn_original_1e300) { return cfg_try(ctx, "rope_scaling", "{\"type\": \"yarn\", \"factor\": 4, \"original_max_position_embeddings\": 1e300}"); }
CASE(cfg_yarn_factor_below_1) { return cfg_try(ctx, "rope_scaling", "{\"type\": \"yarn\", \"factor\": 0.5, \"original_max_position_embeddings\": 4}"); }
CASE(cfg_yarn_no_factor) { return cfg_try(ctx, "rope_scaling", "{\"type\": \"yarn\", \"original_max_position_embeddings\": 4}"); }
CASE(cfg_yarn_beta_fast_zero) { return cfg_try(ctx, "rope_scaling", YARN(", \"beta_fast\": 0")); }
CASE(cfg_yarn_mscale_negative) { return cfg_try(ctx, "rope_scaling", YARN(", \"mscale\": -1, \"mscale_all_dim\": 1")); }
CASE(cfg_yarn_attention_factor) { return cfg_try(ctx, "rope_scaling", YARN(", \"attention_factor\": 1.2")); }
CASE(cfg_yarn_truncate_false) { return cfg_try(ctx, "rope_scaling", YARN(", \"truncate\": false")); }
CASE(cfg_yarn_unknown_key) { return cfg_try(ctx, "rope_scaling", YARN(", \"low_freq_factor\": 1")); }
CASE(cfg_yarn_duplicate_key) { return cfg_try(ctx, "rope_scaling", YARN(", \"factor\": 8")); }
CASE(cfg_rope_type_llama3) { return cfg_try(ctx, "rope_scaling", "{\"rope_type\": \"llama3\", \"factor\": 8}"); }
CASE(cfg_rope_default_with_factor) { return cfg_try(ctx, "rope_scaling", "{\"rope_type\": \"default\", \"factor\": 8}"); }
CASE(cfg_rope_no_type) { return cfg_try(ctx, "rope_scaling", "{\"factor\": 4}"); }
CASE(cfg_rope_not_object) { return cfg_try(ctx, "rope_scaling", "[4]"); }
CASE(cfg_rope_both_forms) { return cfg_try(ctx, "rope_parameters", "{\"rope_type\": \"default\", \"rope_theta\": 10000}"); }
CASE(cfg_rope_theta_one) { return cfg_try(ctx, "rope_theta", "1"); }
CASE(cfg_not_object) { return cfg_try_text(ctx, "[1, 2]"); }
CASE(cfg_null_text) {
    moe_config c;
    return moe_config_parse(ctx, NULL, 4, &c);
}

/* ---- Hugging Face directories: a small model saved with moe_model_save_hf, then tampered ---- */

static moe_config hf_small_config(void) {
    moe_config c = moe_config_tiny();
    c.vocab_size = 32; c.hidden_size = 16; c.intermediate_size = 32; c.moe_intermediate_size = 8;
    c.num_hidden_layers = 2; c.first_k_dense_replace = 1; c.num_attention_heads = 2;
    c.q_lora_rank = 8; c.kv_lora_rank = 8; c.qk_nope_head_dim = 4; c.qk_rope_head_dim = 4; c.v_head_dim = 4;
    c.n_routed_experts = 4; c.num_experts_per_tok = 2; c.n_group = 2; c.topk_group = 1;
    c.max_position_embeddings = 16;
    return c;
}

static char g_hfdir[256];
static char g_hfpath[512];
static const char *hf_file(const char *name) {
    snprintf(g_hfpath, sizeof g_hfpath, "%s/%s", g_hfdir, name);
    return g_hfpath;
}

/* build/bi_hf_<pid>/ with config.json and model.safetensors of a fresh model of config c (seed 7). */
static int hf_make_cfg(moe_ctx *ctx, moe_config c, const moe_hf_save_opts *opts) {
    moe_model *m = NULL;
    moe_status s;
    snprintf(g_hfdir, sizeof g_hfdir, "build/bi_hf_%ld", bi_pid());
#if BI_POSIX
    mkdir(g_hfdir, 0777);
#endif
    s = moe_model_new(ctx, &c, 7, &m);
    need(ctx, s, "moe_model_new");
    if (s) return 0;
    s = moe_model_save_hf(ctx, m, g_hfdir, opts);
    need(ctx, s, "moe_model_save_hf");
    moe_model_free(ctx, m);
    return s == MOE_OK;
}
/* The same for the small config. */
static int hf_make(moe_ctx *ctx, const moe_hf_save_opts *opts) { return hf_make_cfg(ctx, hf_small_config(), opts); }

/* Remove everything hf_make and the cases may have put in the directory. */
static void hf_clean(void) {
    static const char *const files[] = {"config.json", "model.safetensors", "model.safetensors.index.json",
                                        "model-00001-of-00002.safetensors"};
    size_t i;
    for (i = 0; i < sizeof files / sizeof files[0]; i++) {
        remove(hf_file(files[i]));
#if BI_POSIX
        rmdir(g_hfpath); /* a case may have put a directory there */
#endif
    }
#if BI_POSIX
    rmdir(g_hfdir);
#endif
}

static int hf_write(const char *name, const char *text) {
    FILE *fp = fopen(hf_file(name), "wb");
    size_t n = strlen(text);
    if (!fp || fwrite(text, 1, n, fp) != n) {
        if (fp) fclose(fp);
        bi_flag("cannot write into the HF directory");
        return 0;
    }
    fclose(fp);
    return 1;
}

/* Rewrite model.safetensors: drop one tensor, halve the first dim of another, give a third
   another dtype (same bytes), and/or add an extra F32 [4] tensor. */
static int hf_rewrite(moe_ctx *ctx, const char *drop, const char *reshape, const char *retype, moe_st_dtype new_dtype,
                      const char *extra) {
    moe_st_file *f = NULL;
    moe_st_writer *w = NULL;
    int64_t i;
    moe_status s = moe_st_open(ctx, hf_file("model.safetensors"), &f);
    need(ctx, s, "moe_st_open (model.safetensors)");
    if (s) return 0;
    s = moe_st_writer_new(ctx, &w);
    for (i = 0; s == MOE_OK && i < moe_st_count(f); i++) {
        const moe_st_tensor *t = moe_st_get(f, i);
        int64_t shape[MOE_ST_MAX_DIMS];
        moe_st_dtype dt = t->dtype;
        memcpy(shape, t->shape, sizeof shape);
        if (drop && strcmp(t->name, drop) == 0) continue;
        if (reshape && strcmp(t->name, reshape) == 0) shape[0] /= 2;
        if (retype && strcmp(t->name, retype) == 0) dt = new_dtype;
        s = moe_st_writer_add(ctx, w, t->name, dt, t->ndim, shape, t->data);
    }
    if (s == MOE_OK && extra) {
        int64_t s4 = 4;
        s = moe_st_writer_add(ctx, w, extra, MOE_ST_F32, 1, &s4, g_wdata);
    }
    if (s == MOE_OK) s = moe_st_writer_save(ctx, w, hf_file("model.safetensors"));
    need(ctx, s, "rewriting model.safetensors");
    moe_st_writer_free(w);
    moe_st_close(f);
    return s == MOE_OK;
}

/* moe_model_load_hf on the directory; a model that loads anyway is freed; then clean up. */
static moe_status hf_load(moe_ctx *ctx) {
    moe_model *m = NULL;
    moe_status s = moe_model_load_hf(ctx, g_hfdir, &m);
    if (s != MOE_OK && m) bi_flag("moe_model_load_hf failed but set *out");
    if (s == MOE_OK) moe_model_free(ctx, m);
    hf_clean();
    return s;
}
#define HF_SETUP()                       \
    do {                                 \
        if (!hf_make(ctx, NULL)) {       \
            hf_clean();                  \
            return MOE_ERR_IO;           \
        }                                \
    } while (0)

#if BI_POSIX
CASE(hf_missing_config) {
    HF_SETUP();
    remove(hf_file("config.json"));
    return hf_load(ctx);
}
CASE(hf_config_invalid_json) {
    HF_SETUP();
    hf_write("config.json", "{\"hidden_size\": 16, \"num_hidden_layers\": 2,}\n");
    return hf_load(ctx);
}
CASE(hf_config_not_object) {
    HF_SETUP();
    hf_write("config.json", "[16, 2]\n");
    return hf_load(ctx);
}
CASE(hf_missing_safetensors) {
    HF_SETUP();
    remove(hf_file("model.safetensors"));
    return hf_load(ctx);
}
CASE(hf_truncated_safetensors) { /* the last byte of the data cut off */
    struct stat sb;
    HF_SETUP();
    if (stat(hf_file("model.safetensors"), &sb) != 0 || truncate(g_hfpath, sb.st_size - 1) != 0)
        bi_flag("cannot truncate model.safetensors");
    return hf_load(ctx);
}
CASE(hf_tensor_missing) {
    HF_SETUP();
    if (hf_rewrite(ctx, "model.norm.weight", NULL, NULL, MOE_ST_F32, NULL)) return hf_load(ctx);
    hf_clean();
    return MOE_ERR_IO;
}
CASE(hf_expert_tensor_missing) {
    HF_SETUP();
    if (hf_rewrite(ctx, "model.layers.1.mlp.experts.2.up_proj.weight", NULL, NULL, MOE_ST_F32, NULL)) return hf_load(ctx);
    hf_clean();
    return MOE_ERR_IO;
}
CASE(hf_extra_tensor) {
    HF_SETUP();
    if (hf_rewrite(ctx, NULL, NULL, NULL, MOE_ST_F32, "model.layers.0.mlp.bogus.weight")) return hf_load(ctx);
    hf_clean();
    return MOE_ERR_IO;
}
CASE(hf_wrong_shape) {
    HF_SETUP();
    if (hf_rewrite(ctx, NULL, "model.layers.1.self_attn.kv_b_proj.weight", NULL, MOE_ST_F32, NULL)) return hf_load(ctx);
    hf_clean();
    return MOE_ERR_IO;
}
CASE(hf_wrong_dtype) {
    HF_SETUP();
    if (hf_rewrite(ctx, NULL, NULL, "model.layers.0.input_layernorm.weight", MOE_ST_I32, NULL)) return hf_load(ctx);
    hf_clean();
    return MOE_ERR_IO;
}
CASE(hf_fp8_without_scale) { /* an F8_E4M3 weight (first numel bytes of the F32 data) with no weight_scale_inv */
    HF_SETUP();
    if (hf_rewrite(ctx, NULL, NULL, "model.layers.0.self_attn.o_proj.weight", MOE_ST_F8_E4M3, NULL)) return hf_load(ctx);
    hf_clean();
    return MOE_ERR_IO;
}
CASE(hf_index_dotdot_shard) {
    HF_SETUP();
    hf_write("model.safetensors.index.json",
             "{\"metadata\": {}, \"weight_map\": {\"model.norm.weight\": \"../bi_evil.safetensors\"}}\n");
    return hf_load(ctx);
}
CASE(hf_index_absolute_shard) {
    HF_SETUP();
    hf_write("model.safetensors.index.json", "{\"weight_map\": {\"model.norm.weight\": \"/etc/passwd\"}}\n");
    return hf_load(ctx);
}
CASE(hf_index_escaped_dotdot_shard) { /* "\u002e\u002e\u002fx" is "../x" once decoded */
    HF_SETUP();
    hf_write("model.safetensors.index.json",
             "{\"weight_map\": {\"model.norm.weight\": \"\\u002e\\u002e\\u002fbi_evil.safetensors\"}}\n");
    return hf_load(ctx);
}
CASE(hf_index_no_weight_map) {
    HF_SETUP();
    hf_write("model.safetensors.index.json", "{\"metadata\": {\"total_size\": 4}}\n");
    return hf_load(ctx);
}
CASE(hf_index_invalid_json) {
    HF_SETUP();
    hf_write("model.safetensors.index.json", "{\"weight_map\": {\"model.norm.weight\": \"model.safetensors\"\n");
    return hf_load(ctx);
}
CASE(hf_index_missing_shard) {
    HF_SETUP();
    hf_write("model.safetensors.index.json",
             "{\"weight_map\": {\"model.norm.weight\": \"model-00001-of-00002.safetensors\"}}\n");
    return hf_load(ctx);
}
/* Rewrite model.safetensors through an edit callback: it sees each tensor (a writable copy of
   its bytes) and returns 0 to drop it; `extra` may add tensors at the end. */
typedef int (*hf_edit_fn)(const char *name, moe_st_dtype *dtype, int *ndim, int64_t *shape, unsigned char *data);
typedef moe_status (*hf_extra_fn)(moe_ctx *ctx, moe_st_file *f, moe_st_writer *w);
static int hf_edit(moe_ctx *ctx, hf_edit_fn edit, hf_extra_fn extra) {
    moe_st_file *f = NULL;
    moe_st_writer *w = NULL;
    int64_t i;
    moe_status s = moe_st_open(ctx, hf_file("model.safetensors"), &f);
    need(ctx, s, "moe_st_open (model.safetensors)");
    if (s) return 0;
    s = moe_st_writer_new(ctx, &w);
    for (i = 0; s == MOE_OK && i < moe_st_count(f); i++) {
        const moe_st_tensor *t = moe_st_get(f, i);
        int64_t shape[MOE_ST_MAX_DIMS];
        moe_st_dtype dt = t->dtype;
        int nd = t->ndim;
        unsigned char *copy = (unsigned char *)malloc(t->bytes + 1);
        if (!copy) { s = MOE_ERR_MEMORY; break; }
        memcpy(shape, t->shape, sizeof shape);
        if (t->bytes) memcpy(copy, t->data, t->bytes);
        if (!edit || edit(t->name, &dt, &nd, shape, copy)) s = moe_st_writer_add(ctx, w, t->name, dt, nd, shape, copy);
        free(copy);
    }
    if (s == MOE_OK && extra) s = extra(ctx, f, w);
    if (s == MOE_OK) s = moe_st_writer_save(ctx, w, hf_file("model.safetensors"));
    need(ctx, s, "rewriting model.safetensors");
    moe_st_writer_free(w);
    moe_st_close(f);
    return s == MOE_OK;
}
#define HF_EDIT_LOAD(edit, extra)             \
    do {                                      \
        if (hf_edit(ctx, edit, extra)) return hf_load(ctx); \
        hf_clean();                           \
        return MOE_ERR_IO;                    \
    } while (0)

/* Element i of little-endian F32 bytes. */
static void set_f32(unsigned char *data, int64_t i, float v) {
    uint32_t u;
    int b;
    memcpy(&u, &v, 4);
    for (b = 0; b < 4; b++) data[4 * i + b] = (unsigned char)(u >> (8 * b));
}

/* The experts of layer 1 as one fused stack, named as transformers 5 holds them in memory. */
static int edit_drop_layer1_gate_up(const char *name, moe_st_dtype *dt, int *nd, int64_t *shape, unsigned char *data) {
    (void)dt; (void)nd; (void)shape; (void)data;
    return !(strncmp(name, "model.layers.1.mlp.experts.", 27) == 0 && (strstr(name, "gate_proj") || strstr(name, "up_proj")));
}
static int g_fused_transposed;
static moe_status extra_fused_gate_up(moe_ctx *ctx, moe_st_file *f, moe_st_writer *w) {
    /* [E, 2I, H] = per expert the gate rows then the up rows; transposed: [E, H, 2I] (same numel) */
    int64_t E = 4, I = 4, H = 16, e, r, c, shape[3];
    float *buf = (float *)malloc(sizeof(float) * (size_t)(E * 2 * I * H));
    moe_status s;
    if (!buf) return MOE_ERR_MEMORY;
    for (e = 0; e < E; e++) {
        char name[128];
        int half;
        for (half = 0; half < 2; half++) {
            const moe_st_tensor *t;
            snprintf(name, sizeof name, "model.layers.1.mlp.experts.%lld.%s_proj.weight", (long long)e, half ? "up" : "gate");
            t = moe_st_find(f, name);
            if (!t || t->numel != I * H) { free(buf); return MOE_ERR_IO; }
            for (r = 0; r < I; r++)
                for (c = 0; c < H; c++) {
                    float v = moe_st_value(t, r * H + c);
                    if (g_fused_transposed) buf[(e * H + c) * 2 * I + half * I + r] = v;
                    else buf[(e * 2 * I + half * I + r) * H + c] = v;
                }
        }
    }
    shape[0] = E;
    shape[1] = g_fused_transposed ? H : 2 * I;
    shape[2] = g_fused_transposed ? 2 * I : H;
    s = moe_st_writer_add(ctx, w, "model.layers.1.mlp.experts.gate_up_proj", MOE_ST_F32, 3, shape, buf);
    free(buf);
    return s;
}
static moe_config hf_fused_config(void) {
    moe_config c = hf_small_config();
    c.moe_intermediate_size = 4; /* 2I = 8 differs from H = 16, so [E, H, 2I] is not [E, 2I, H] */
    return c;
}
CASE(hf_fused_gate_up_transposed) {
    if (!hf_make_cfg(ctx, hf_fused_config(), NULL)) { hf_clean(); return MOE_ERR_IO; }
    g_fused_transposed = 1;
    HF_EDIT_LOAD(edit_drop_layer1_gate_up, extra_fused_gate_up);
}
static int edit_halve_norm(const char *name, moe_st_dtype *dt, int *nd, int64_t *shape, unsigned char *data) {
    (void)dt; (void)nd; (void)data;
    if (strcmp(name, "model.norm.weight") == 0) shape[0] /= 2;
    return 1;
}
CASE(hf_norm_wrong_shape_message) { /* "[8], want [16]", not "[80], want [160]" */
    HF_SETUP();
    HF_EDIT_LOAD(edit_halve_norm, NULL);
}
static int edit_nan_norm(const char *name, moe_st_dtype *dt, int *nd, int64_t *shape, unsigned char *data) {
    (void)dt; (void)nd; (void)shape;
    if (strcmp(name, "model.norm.weight") == 0) set_f32(data, 5, NAN);
    return 1;
}
CASE(hf_nan_weight) {
    HF_SETUP();
    HF_EDIT_LOAD(edit_nan_norm, NULL);
}
static int edit_inf_expert(const char *name, moe_st_dtype *dt, int *nd, int64_t *shape, unsigned char *data) {
    (void)dt; (void)nd; (void)shape;
    if (strcmp(name, "model.layers.1.mlp.experts.3.down_proj.weight") == 0) set_f32(data, 0, -INFINITY);
    return 1;
}
CASE(hf_inf_expert_weight) {
    HF_SETUP();
    HF_EDIT_LOAD(edit_inf_expert, NULL);
}
static int edit_nan_bias(const char *name, moe_st_dtype *dt, int *nd, int64_t *shape, unsigned char *data) {
    (void)dt; (void)nd; (void)shape;
    if (strcmp(name, "model.layers.1.mlp.gate.e_score_correction_bias") == 0) set_f32(data, 1, NAN);
    return 1;
}
CASE(hf_nan_expert_bias) {
    HF_SETUP();
    HF_EDIT_LOAD(edit_nan_bias, NULL);
}
static int edit_fp8_scale_inf(const char *name, moe_st_dtype *dt, int *nd, int64_t *shape, unsigned char *data) {
    (void)dt; (void)nd; (void)shape;
    if (strcmp(name, "model.layers.0.self_attn.o_proj.weight_scale_inv") == 0) set_f32(data, 0, INFINITY);
    return 1;
}
static int edit_fp8_nan_code(const char *name, moe_st_dtype *dt, int *nd, int64_t *shape, unsigned char *data) {
    (void)dt; (void)nd; (void)shape;
    if (strcmp(name, "model.layers.0.self_attn.o_proj.weight") == 0) data[3] = 0x7F; /* E4M3 NaN */
    return 1;
}
static moe_hf_save_opts fp8_opts(void) {
    moe_hf_save_opts o;
    memset(&o, 0, sizeof o);
    o.fp8 = 1;
    o.fp8_block = 8;
    return o;
}
CASE(hf_fp8_scale_inf) {
    moe_hf_save_opts o = fp8_opts();
    if (!hf_make(ctx, &o)) { hf_clean(); return MOE_ERR_IO; }
    HF_EDIT_LOAD(edit_fp8_scale_inf, NULL);
}
CASE(hf_fp8_nan_code) {
    moe_hf_save_opts o = fp8_opts();
    if (!hf_make(ctx, &o)) { hf_clean(); return MOE_ERR_IO; }
    HF_EDIT_LOAD(edit_fp8_nan_code, NULL);
}
static int edit_fp8_scale_shape(const char *name, moe_st_dtype *dt, int *nd, int64_t *shape, unsigned char *data) {
    (void)dt; (void)nd; (void)data;
    if (strcmp(name, "model.layers.0.self_attn.o_proj.weight_scale_inv") == 0) { shape[1] = shape[0]; shape[0] = 1; }
    return 1;
}
CASE(hf_fp8_scale_wrong_shape) {
    moe_hf_save_opts o = fp8_opts();
    if (!hf_make(ctx, &o)) { hf_clean(); return MOE_ERR_IO; }
    HF_EDIT_LOAD(edit_fp8_scale_shape, NULL);
}
/* quantization_config of an FP8 directory, rewritten */
static moe_status hf_fp8_quant(moe_ctx *ctx, const char *quant) {
    moe_hf_save_opts o = fp8_opts();
    char cfg[4096], *end;
    FILE *fp;
    size_t n;
    if (!hf_make(ctx, &o)) { hf_clean(); return MOE_ERR_IO; }
    fp = fopen(hf_file("config.json"), "rb");
    n = fp ? fread(cfg, 1, sizeof cfg - 1, fp) : 0;
    if (fp) fclose(fp);
    cfg[n] = 0;
    end = strstr(cfg, "\"quantization_config\"");
    if (!end) { bi_flag("no quantization_config in the FP8 config.json"); hf_clean(); return MOE_ERR_IO; }
    snprintf(end, sizeof cfg - (size_t)(end - cfg), "\"quantization_config\": %s\n}\n", quant);
    hf_write("config.json", cfg);
    return hf_load(ctx);
}
CASE(hf_quant_block_zero) { return hf_fp8_quant(ctx, "{\"quant_method\": \"fp8\", \"weight_block_size\": [0, 0]}"); }
CASE(hf_quant_block_fraction) { return hf_fp8_quant(ctx, "{\"quant_method\": \"fp8\", \"weight_block_size\": [8.5, 8.5]}"); }
CASE(hf_quant_block_nonsquare) { return hf_fp8_quant(ctx, "{\"quant_method\": \"fp8\", \"weight_block_size\": [8, 16]}"); }
CASE(hf_quant_block_one_number) { return hf_fp8_quant(ctx, "{\"quant_method\": \"fp8\", \"weight_block_size\": 8}"); }
CASE(hf_quant_method_other) { return hf_fp8_quant(ctx, "{\"quant_method\": \"awq\", \"weight_block_size\": [8, 8]}"); }
CASE(hf_quant_block_wrong_size) { /* 16x16 blocks announced, 8x8 scales stored */
    return hf_fp8_quant(ctx, "{\"quant_method\": \"fp8\", \"weight_block_size\": [16, 16]}");
}
CASE(hf_config_attention_bias) {
    HF_SETUP();
    hf_write("config.json", "{\"vocab_size\": 32, \"hidden_size\": 16, \"attention_bias\": true}\n");
    return hf_load(ctx);
}
/* A two-shard index over the one model.safetensors (renamed): entries that lie */
static moe_status hf_index(moe_ctx *ctx, const char *weight_map) {
    char text[1024];
    snprintf(text, sizeof text, "{\"metadata\": {}, \"weight_map\": {%s}}\n", weight_map);
    hf_write("model.safetensors.index.json", text);
    return hf_load(ctx);
}
CASE(hf_index_lists_too_few) { /* one shard, but the index names only one of its tensors */
    HF_SETUP();
    return hf_index(ctx, "\"model.norm.weight\": \"model.safetensors\"");
}
CASE(hf_index_names_absent_tensor) {
    HF_SETUP();
    return hf_index(ctx, "\"model.norm.weight\": \"model.safetensors\", \"model.bogus\": \"model.safetensors\"");
}
CASE(hf_index_duplicate_entry) {
    HF_SETUP();
    return hf_index(ctx, "\"model.norm.weight\": \"model.safetensors\", \"model.norm.weight\": \"model.safetensors\"");
}
CASE(hf_index_shard_not_string) {
    HF_SETUP();
    return hf_index(ctx, "\"model.norm.weight\": 3");
}
/* Not regular files where a file belongs: refused at once, never read (a FIFO would block) */
static moe_status hf_replace_by(moe_ctx *ctx, const char *name, int fifo) {
    HF_SETUP();
    remove(hf_file(name));
    if ((fifo ? mkfifo(hf_file(name), 0600) : mkdir(hf_file(name), 0700)) != 0) {
        bi_flag(fifo ? "mkfifo failed" : "mkdir failed");
        hf_clean();
        return MOE_ERR_IO;
    }
    return hf_load(ctx);
}
CASE(hf_safetensors_fifo) { return hf_replace_by(ctx, "model.safetensors", 1); }
CASE(hf_safetensors_directory) { return hf_replace_by(ctx, "model.safetensors", 0); }
CASE(hf_config_fifo) { return hf_replace_by(ctx, "config.json", 1); }
CASE(hf_config_directory) { return hf_replace_by(ctx, "config.json", 0); }
CASE(hf_index_fifo) { return hf_replace_by(ctx, "model.safetensors.index.json", 1); }
CASE(hf_index_directory) { return hf_replace_by(ctx, "model.safetensors.index.json", 0); }
/* the same for the other loaders, on build/bi_special_<pid> */
static char g_special[256];
static int special_make(int fifo) {
    snprintf(g_special, sizeof g_special, "build/bi_special_%ld", bi_pid());
    remove(g_special);
    rmdir(g_special);
    if ((fifo ? mkfifo(g_special, 0600) : mkdir(g_special, 0700)) == 0) return 1;
    bi_flag(fifo ? "mkfifo failed" : "mkdir failed");
    return 0;
}
static moe_status special_done(moe_status s) {
    remove(g_special);
    rmdir(g_special);
    return s;
}
CASE(st_open_fifo) {
    moe_st_file *f = NULL;
    if (!special_make(1)) return MOE_ERR_IO;
    return special_done(moe_st_open(ctx, g_special, &f));
}
CASE(st_open_directory) { /* once printed as "9223372036854775807 bytes" */
    moe_st_file *f = NULL;
    if (!special_make(0)) return MOE_ERR_IO;
    return special_done(moe_st_open(ctx, g_special, &f));
}
CASE(config_load_fifo) {
    moe_config c;
    if (!special_make(1)) return MOE_ERR_IO;
    return special_done(moe_config_load(ctx, g_special, &c));
}
CASE(data_load_fifo) {
    moe_dataset *d = NULL;
    if (!special_make(1)) return MOE_ERR_IO;
    return special_done(moe_data_load(ctx, g_special, 0.1, &d));
}
CASE(data_load_directory) {
    moe_dataset *d = NULL;
    if (!special_make(0)) return MOE_ERR_IO;
    return special_done(moe_data_load(ctx, g_special, 0.1, &d));
}
CASE(distill_cache_fifo) {
    moe_distill_cache *c = NULL;
    if (!special_make(1)) return MOE_ERR_IO;
    return special_done(moe_distill_cache_open(ctx, g_special, &c));
}
CASE(distill_cache_directory) {
    moe_distill_cache *c = NULL;
    if (!special_make(0)) return MOE_ERR_IO;
    return special_done(moe_distill_cache_open(ctx, g_special, &c));
}
/* Fuzzing regression: a teacher cache whose header claims a 2^31 - 1 token vocabulary (one
   record of 76 bytes) made the reader allocate 2 GiB for its repeated-id check. It now sorts
   each record's k ids instead; the record (a repeated id, written here with a valid checksum)
   is refused without that allocation. */
CASE(distill_cache_huge_vocab) {
    char path[256];
    moe_distill_writer *w = NULL;
    moe_distill_cache *c = NULL;
    moe_tensor *t = NULL, *ids, *logp, *tail;
    int64_t shape[2] = {1, 16}, i;
    unsigned char buf[256];
    size_t n;
    uint64_t h;
    FILE *fp;
    moe_status s;
    snprintf(path, sizeof path, "build/bi_teacher_%ld.bin", bi_pid());
    need(ctx, moe_tensor_new(ctx, MOE_F32, 2, shape, &t), "moe_tensor_new");
    if (!t) return MOE_ERR_MEMORY;
    for (i = 0; i < 16; i++) moe_tensor_set(t, i, 0.1 * (double)i);
    need(ctx, moe_distill_writer_new(ctx, path, 16, 2, 1.0f, 0, &w), "moe_distill_writer_new");
    if (w) need(ctx, moe_distill_writer_add(ctx, w, t), "moe_distill_writer_add");
    if (w) need(ctx, moe_distill_writer_finish(ctx, w), "moe_distill_writer_finish");
    moe_distill_writer_free(w);
    moe_tensor_free(ctx, t);
    fp = fopen(path, "rb");
    n = fp ? fread(buf, 1, sizeof buf, fp) : 0;
    if (fp) fclose(fp);
    if (n != 64 + 2 * 8 + 4) { bi_flag("unexpected teacher cache size"); remove(path); return MOE_ERR_IO; }
    moe__le_put64(buf + 16, 0x7FFFFFFFu);     /* vocab */
    memcpy(buf + 64 + 4, buf + 64, 4);         /* id 1 = id 0 */
    h = moe__fnv1a(MOE__FNV_SEED, buf + 64, n - 64);
    moe__le_put64(buf + 56, moe__fnv1a(h, buf, 56));
    fp = fopen(path, "wb");
    if (!fp || fwrite(buf, 1, n, fp) != n) bi_flag("cannot rewrite the teacher cache");
    if (fp) fclose(fp);
    s = moe_distill_cache_open(ctx, path, &c);
    need(ctx, s, "moe_distill_cache_open of the patched file");
    if (s == MOE_OK) s = moe_distill_cache_read(ctx, c, 0, 1, &ids, &logp, &tail);
    moe_distill_cache_close(c);
    remove(path);
    return s;
}
CASE(hf_null_dir) {
    moe_model *m = NULL;
    return moe_model_load_hf(ctx, NULL, &m);
}
CASE(hf_null_out) { return moe_model_load_hf(ctx, "build", NULL); }
CASE(hf_missing_dir) {
    moe_model *m = NULL;
    moe_status s = moe_model_load_hf(ctx, "build/bi_no_such_dir", &m);
    moe_model_free(ctx, m);
    return s;
}
CASE(hf_save_null_model) { return moe_model_save_hf(ctx, NULL, "build", NULL); }
CASE(hf_save_missing_dir) {
    moe_config c = hf_small_config();
    moe_model *m = NULL;
    moe_status s;
    need(ctx, moe_model_new(ctx, &c, 1, &m), "moe_model_new");
    if (!m) return MOE_ERR_MEMORY;
    s = moe_model_save_hf(ctx, m, "build/bi_no_such_dir", NULL);
    moe_model_free(ctx, m);
    return s;
}
#endif /* BI_POSIX */

/* ---- checkpoints: a small model's checkpoint taken apart into its records, changed in one
   place and put back together with a correct length and FNV-1a checksum (computed here), so
   that only moe_ckpt_load's checks of the fields themselves can refuse it ---- */

#define BI_CK_MAX_REC 256
typedef struct bi_ck_rec {
    const unsigned char *at; /* the whole record as written */
    size_t len;
    char name[128];
    int kind, dtype, ndim;
    uint64_t dims[8];
    int64_t numel;
} bi_ck_rec;
typedef struct bi_ck {
    unsigned char *file;
    size_t len;
    size_t state_at, state_len; /* the state block between the config and the record count */
    uint32_t version;
    bi_ck_rec rec[BI_CK_MAX_REC];
    int n;
    int first_moment, first_value_of_param, expert_bias; /* record indices (-1: none) */
} bi_ck;
typedef struct bi_bytes {
    unsigned char *p;
    size_t len, cap;
} bi_bytes;

static void bb_put(bi_bytes *b, const void *src, size_t n) {
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 1 << 16;
        unsigned char *q;
        while (cap < b->len + n) cap *= 2;
        q = (unsigned char *)realloc(b->p, cap);
        if (!q) { bi_flag("out of memory building a checkpoint"); return; }
        b->p = q;
        b->cap = cap;
    }
    if (n) memcpy(b->p + b->len, src, n);
    b->len += n;
}
static void bb_u64(bi_bytes *b, uint64_t v) {
    unsigned char x[8];
    put_u64le(x, v);
    bb_put(b, x, 8);
}
static void bb_u32(bi_bytes *b, uint32_t v) {
    unsigned char x[4];
    int i;
    for (i = 0; i < 4; i++) x[i] = (unsigned char)(v >> (8 * i));
    bb_put(b, x, 4);
}
static uint64_t get_le(const unsigned char *p, int bytes) {
    uint64_t v = 0;
    int i;
    for (i = bytes - 1; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static char g_ckpath[256];
static const char *ck_path(void) {
    snprintf(g_ckpath, sizeof g_ckpath, "build/bi_ck_%ld.bin", bi_pid());
    return g_ckpath;
}

/* Save the small model (with AdamW moments of `moments`: MOE_F32, MOE_BF16, or MOE_I32 for
   none) after one training step, read the file back and split it into records. */
static int ck_make(moe_ctx *ctx, moe_dtype moments, bi_ck *c) {
    moe_config cfg = hf_small_config();
    moe_model *m = NULL;
    moe_adamw *o = NULL;
    moe_adamw_config ac;
    moe_train_state st;
    moe_tensor *loss = NULL;
    int32_t toks[2 * 9];
    size_t at, cl;
    FILE *fp;
    long size;
    int i, k;
    memset(c, 0, sizeof *c);
    memset(&ac, 0, sizeof ac);
    memset(&st, 0, sizeof st);
    st.step = 1; st.seed = 3; st.data_index = 1; st.tokens_seen = 16;
    c->first_moment = c->first_value_of_param = c->expert_bias = -1;
    for (i = 0; i < 18; i++) toks[i] = (i * 7) % 32;
    need(ctx, moe_model_new(ctx, &cfg, 5, &m), "moe_model_new");
    if (m && moments != MOE_I32) {
        ac.moment_dtype = moments;
        need(ctx, moe_adamw_new(ctx, m, &ac, &o), "moe_adamw_new");
        if (o) need(ctx, moe_model_loss(ctx, m, toks, 2, 8, NULL, &loss, NULL), "moe_model_loss");
        if (loss) need(ctx, moe_backward(ctx, loss), "moe_backward");
        if (loss) need(ctx, moe_adamw_step(ctx, o, 1e-2f, 1.0f, 1.0f, NULL), "moe_adamw_step");
        moe_ctx_reset(ctx);
    }
    if (m && !g_setup_err[0]) need(ctx, moe_ckpt_save(ctx, ck_path(), m, o, &st), "moe_ckpt_save");
    moe_adamw_free(ctx, o);
    moe_model_free(ctx, m);
    if (g_setup_err[0]) return 0;
    fp = fopen(ck_path(), "rb");
    if (!fp || fseek(fp, 0, SEEK_END) != 0 || (size = ftell(fp)) < 64 || fseek(fp, 0, SEEK_SET) != 0) {
        if (fp) fclose(fp);
        bi_flag("cannot read the checkpoint back");
        return 0;
    }
    c->len = (size_t)size;
    c->file = (unsigned char *)malloc(c->len);
    if (!c->file || fread(c->file, 1, c->len, fp) != c->len) bi_flag("cannot read the checkpoint back");
    fclose(fp);
    remove(ck_path());
    if (g_setup_err[0]) return 0;
    /* "MOECKPT1", u32 version, u32 0, u64 payload; u32 + config; state; u32 count; records */
    c->version = (uint32_t)get_le(c->file + 8, 4);
    cl = (size_t)get_le(c->file + 24, 4);
    c->state_at = 28 + cl;
    c->state_len = 5 * 8 + 4;
    if (c->version >= 2) {
        size_t nu = (size_t)get_le(c->file + c->state_at + c->state_len + 16, 4);
        c->state_len += 8 + 8 + 4 + 8 * nu;
    }
    at = c->state_at + c->state_len;
    c->n = (int)get_le(c->file + at, 4);
    at += 4;
    if (c->n > BI_CK_MAX_REC) { bi_flag("the checkpoint has more records than the test can hold"); return 0; }
    for (i = 0; i < c->n; i++) {
        bi_ck_rec *r = &c->rec[i];
        size_t nl = (size_t)get_le(c->file + at, 2);
        r->at = c->file + at;
        memcpy(r->name, c->file + at + 2, nl < sizeof r->name ? nl : sizeof r->name - 1);
        r->name[nl < sizeof r->name ? nl : sizeof r->name - 1] = 0;
        at += 2 + nl;
        r->kind = c->file[at];
        r->dtype = c->file[at + 1];
        r->ndim = c->file[at + 2];
        at += 3;
        r->numel = 1;
        for (k = 0; k < r->ndim && k < 8; k++) {
            r->dims[k] = get_le(c->file + at, 8);
            r->numel *= (int64_t)r->dims[k];
            at += 8;
        }
        at += (size_t)r->numel * (r->dtype ? 2 : 4);
        r->len = (size_t)(c->file + at - r->at);
        if (at > c->len - 8) { bi_flag("the checkpoint did not parse"); return 0; }
        if (r->kind && c->first_moment < 0) c->first_moment = i;
        if (!r->kind && i + 1 < c->n && c->first_value_of_param < 0 && get_le(c->file + at, 2) == nl &&
            memcmp(c->file + at + 2, r->name, nl) == 0)
            c->first_value_of_param = i; /* the next record is its moment */
        if (strstr(r->name, "e_score_correction_bias") && c->expert_bias < 0) c->expert_bias = i;
    }
    if (c->expert_bias < 0) bi_flag("the checkpoint holds no expert bias record");
    return !g_setup_err[0];
}

/* The file up to the records: header, config and state (state_patch, when given, replaces
   the state block and has the same length unless state_len says otherwise). */
static void ck_begin(const bi_ck *c, bi_bytes *out, const unsigned char *state_patch, size_t state_len, uint32_t count) {
    memset(out, 0, sizeof *out);
    bb_put(out, c->file, c->state_at);
    if (state_patch) bb_put(out, state_patch, state_len);
    else bb_put(out, c->file + c->state_at, c->state_len);
    bb_u32(out, count);
}
/* One record with the given header fields and `bytes` data bytes (1, 2, 3, ... when data is NULL). */
static void ck_put_record(bi_bytes *out, const char *name, int kind, int dtype, int ndim, const uint64_t *dims,
                          const unsigned char *data, size_t bytes) {
    unsigned char h[3];
    size_t nl = strlen(name), i;
    int d;
    h[0] = (unsigned char)(nl & 0xFF);
    h[1] = (unsigned char)(nl >> 8);
    bb_put(out, h, 2);
    bb_put(out, name, nl);
    h[0] = (unsigned char)kind; h[1] = (unsigned char)dtype; h[2] = (unsigned char)ndim;
    bb_put(out, h, 3);
    for (d = 0; d < ndim; d++) bb_u64(out, dims[d]);
    if (data) bb_put(out, data, bytes);
    else
        for (i = 0; i < bytes; i++) { unsigned char x = (unsigned char)(i + 1); bb_put(out, &x, 1); }
}
/* The data bytes of a record. */
static const unsigned char *ck_data(const bi_ck_rec *r) { return r->at + r->len - (size_t)r->numel * (r->dtype ? 2 : 4); }

/* Patch the payload length, append the checksum, write the file and load it into a fresh
   small model and (unless `moments` is MOE_I32) an AdamW of that moment dtype. */
static moe_status ck_finish_load(moe_ctx *ctx, bi_ck *c, bi_bytes *out, moe_dtype moments) {
    moe_config cfg = hf_small_config();
    moe_model *m = NULL;
    moe_adamw *o = NULL;
    moe_adamw_config ac;
    moe_train_state st;
    uint64_t h = 0xCBF29CE484222325ull;
    size_t i;
    moe_status s = MOE_ERR_IO;
    FILE *fp;
    if (out->len < 24) bi_flag("checkpoint image too short");
    if (!g_setup_err[0]) {
        put_u64le(out->p + 16, (uint64_t)(out->len - 24));
        for (i = 24; i < out->len; i++) h = (h ^ out->p[i]) * 0x100000001B3ull; /* FNV-1a */
        bb_u64(out, h);
        fp = fopen(ck_path(), "wb");
        if (!fp || fwrite(out->p, 1, out->len, fp) != out->len) bi_flag("cannot write the checkpoint under build/");
        if (fp) fclose(fp);
    }
    memset(&ac, 0, sizeof ac);
    ac.moment_dtype = moments;
    if (!g_setup_err[0]) need(ctx, moe_model_new(ctx, &cfg, 6, &m), "moe_model_new");
    if (m && moments != MOE_I32) need(ctx, moe_adamw_new(ctx, m, &ac, &o), "moe_adamw_new");
    if (!g_setup_err[0]) s = moe_ckpt_load(ctx, ck_path(), m, o, &st);
    moe_adamw_free(ctx, o);
    moe_model_free(ctx, m);
    remove(ck_path());
    free(out->p);
    free(c->file);
    return s;
}
/* Copy every record, replacing record `at` by `with` (NULL: dropped) and appending `extra`. */
static moe_status ck_replace(moe_ctx *ctx, bi_ck *c, int at, const bi_ck_rec *with, moe_dtype load_moments) {
    bi_bytes out;
    int i;
    ck_begin(c, &out, NULL, 0, (uint32_t)(c->n - (with ? 0 : 1)));
    for (i = 0; i < c->n; i++) {
        const bi_ck_rec *r = i == at ? with : &c->rec[i];
        if (r) bb_put(&out, r->at, r->len);
    }
    return ck_finish_load(ctx, c, &out, load_moments);
}
#define CK_SETUP(moments)                    \
    bi_ck ck_;                               \
    if (!ck_make(ctx, moments, &ck_)) {      \
        free(ck_.file);                      \
        return MOE_ERR_IO;                   \
    }

/* The issue-17 heap overflow: bf16 moments announced, one moment record labelled f32 with
   the bytes of an f32 tensor (twice what the bf16 moment buffer holds). */
CASE(ckpt_moment_labelled_f32_in_bf16_file) {
    bi_bytes out;
    int i;
    CK_SETUP(MOE_BF16);
    ck_begin(&ck_, &out, NULL, 0, (uint32_t)ck_.n);
    for (i = 0; i < ck_.n; i++) {
        const bi_ck_rec *r = &ck_.rec[i];
        if (i == ck_.first_moment) ck_put_record(&out, r->name, r->kind, 0, r->ndim, r->dims, NULL, (size_t)r->numel * 4);
        else bb_put(&out, r->at, r->len);
    }
    return ck_finish_load(ctx, &ck_, &out, MOE_BF16);
}
/* The reverse: f32 moments announced, one record labelled bf16 (half the bytes). */
CASE(ckpt_moment_labelled_bf16_in_f32_file) {
    bi_bytes out;
    int i;
    CK_SETUP(MOE_F32);
    ck_begin(&ck_, &out, NULL, 0, (uint32_t)ck_.n);
    for (i = 0; i < ck_.n; i++) {
        const bi_ck_rec *r = &ck_.rec[i];
        if (i == ck_.first_moment) ck_put_record(&out, r->name, r->kind, 1, r->ndim, r->dims, NULL, (size_t)r->numel * 2);
        else bb_put(&out, r->at, r->len);
    }
    return ck_finish_load(ctx, &ck_, &out, MOE_F32);
}
CASE(ckpt_moment_labelled_f32_load_without_optimizer) { /* the file is refused even when the moments are not wanted */
    bi_bytes out;
    int i;
    CK_SETUP(MOE_BF16);
    ck_begin(&ck_, &out, NULL, 0, (uint32_t)ck_.n);
    for (i = 0; i < ck_.n; i++) {
        const bi_ck_rec *r = &ck_.rec[i];
        if (i == ck_.first_moment) ck_put_record(&out, r->name, r->kind, 0, r->ndim, r->dims, NULL, (size_t)r->numel * 4);
        else bb_put(&out, r->at, r->len);
    }
    return ck_finish_load(ctx, &ck_, &out, MOE_I32);
}
CASE(ckpt_value_labelled_bf16) {
    bi_bytes out;
    int i;
    CK_SETUP(MOE_I32);
    ck_begin(&ck_, &out, NULL, 0, (uint32_t)ck_.n);
    for (i = 0; i < ck_.n; i++) {
        const bi_ck_rec *r = &ck_.rec[i];
        if (i == 0) ck_put_record(&out, r->name, 0, 1, r->ndim, r->dims, ck_data(r), (size_t)r->numel * 2);
        else bb_put(&out, r->at, r->len);
    }
    return ck_finish_load(ctx, &ck_, &out, MOE_I32);
}
CASE(ckpt_record_dtype_unknown) {
    bi_bytes out;
    int i;
    CK_SETUP(MOE_F32);
    ck_begin(&ck_, &out, NULL, 0, (uint32_t)ck_.n);
    for (i = 0; i < ck_.n; i++) {
        const bi_ck_rec *r = &ck_.rec[i];
        if (i == ck_.first_moment) ck_put_record(&out, r->name, r->kind, 7, r->ndim, r->dims, ck_data(r), (size_t)r->numel * 4);
        else bb_put(&out, r->at, r->len);
    }
    return ck_finish_load(ctx, &ck_, &out, MOE_F32);
}
CASE(ckpt_record_kind_unknown) {
    bi_bytes out;
    int i;
    CK_SETUP(MOE_F32);
    ck_begin(&ck_, &out, NULL, 0, (uint32_t)ck_.n);
    for (i = 0; i < ck_.n; i++) {
        const bi_ck_rec *r = &ck_.rec[i];
        if (i == ck_.first_moment) ck_put_record(&out, r->name, 3, 0, r->ndim, r->dims, ck_data(r), (size_t)r->numel * 4);
        else bb_put(&out, r->at, r->len);
    }
    return ck_finish_load(ctx, &ck_, &out, MOE_F32);
}
CASE(ckpt_record_shape_transposed) { /* same element count, other shape */
    bi_bytes out;
    int i, done = 0;
    CK_SETUP(MOE_I32);
    ck_begin(&ck_, &out, NULL, 0, (uint32_t)ck_.n);
    for (i = 0; i < ck_.n; i++) {
        const bi_ck_rec *r = &ck_.rec[i];
        if (!done && r->ndim == 2 && r->dims[0] != r->dims[1]) {
            uint64_t d[2];
            d[0] = r->dims[1]; d[1] = r->dims[0];
            ck_put_record(&out, r->name, 0, 0, 2, d, ck_data(r), (size_t)r->numel * 4);
            done = 1;
        } else {
            bb_put(&out, r->at, r->len);
        }
    }
    if (!done) bi_flag("no non-square matrix in the checkpoint");
    return ck_finish_load(ctx, &ck_, &out, MOE_I32);
}
CASE(ckpt_record_ndim_zero) {
    bi_bytes out;
    int i;
    CK_SETUP(MOE_I32);
    ck_begin(&ck_, &out, NULL, 0, (uint32_t)ck_.n);
    for (i = 0; i < ck_.n; i++) {
        const bi_ck_rec *r = &ck_.rec[i];
        if (i == 0) ck_put_record(&out, r->name, 0, 0, 0, r->dims, ck_data(r), 4);
        else bb_put(&out, r->at, r->len);
    }
    return ck_finish_load(ctx, &ck_, &out, MOE_I32);
}
CASE(ckpt_record_unknown_name) {
    bi_bytes out;
    int i;
    CK_SETUP(MOE_I32);
    ck_begin(&ck_, &out, NULL, 0, (uint32_t)ck_.n);
    for (i = 0; i < ck_.n; i++) {
        const bi_ck_rec *r = &ck_.rec[i];
        if (i == 0) ck_put_record(&out, "model.bogus.weight", 0, 0, r->ndim, r->dims, ck_data(r), (size_t)r->numel * 4);
        else bb_put(&out, r->at, r->len);
    }
    return ck_finish_load(ctx, &ck_, &out, MOE_I32);
}
/* One tensor stored twice, another missing: the count and the length are right. */
CASE(ckpt_tensor_twice_other_missing) {
    CK_SETUP(MOE_I32);
    return ck_replace(ctx, &ck_, 1, &ck_.rec[0], MOE_I32);
}
CASE(ckpt_tensor_missing) {
    CK_SETUP(MOE_I32);
    return ck_replace(ctx, &ck_, ck_.n - 1, NULL, MOE_I32);
}
CASE(ckpt_expert_bias_missing) { /* a buffer, not a parameter: still required */
    CK_SETUP(MOE_I32);
    return ck_replace(ctx, &ck_, ck_.expert_bias, NULL, MOE_I32);
}
CASE(ckpt_moment_twice_other_missing) { /* the first moment of a tensor stored where its second belongs */
    CK_SETUP(MOE_F32);
    return ck_replace(ctx, &ck_, ck_.first_moment + 1, &ck_.rec[ck_.first_moment], MOE_F32);
}
CASE(ckpt_moment_missing) {
    CK_SETUP(MOE_F32);
    return ck_replace(ctx, &ck_, ck_.first_moment + 1, NULL, MOE_F32);
}
CASE(ckpt_moment_missing_load_without_optimizer) {
    CK_SETUP(MOE_F32);
    return ck_replace(ctx, &ck_, ck_.first_moment + 1, NULL, MOE_I32);
}
CASE(ckpt_moments_announced_none_held) { /* the state says f32 moments; only values follow */
    bi_bytes out;
    int i, n = 0;
    CK_SETUP(MOE_F32);
    for (i = 0; i < ck_.n; i++) n += ck_.rec[i].kind == 0;
    ck_begin(&ck_, &out, NULL, 0, (uint32_t)n);
    for (i = 0; i < ck_.n; i++)
        if (ck_.rec[i].kind == 0) bb_put(&out, ck_.rec[i].at, ck_.rec[i].len);
    return ck_finish_load(ctx, &ck_, &out, MOE_F32);
}
CASE(ckpt_moments_held_none_announced) { /* the state says no optimizer, moment records follow */
    bi_bytes out;
    unsigned char state[64];
    int i;
    CK_SETUP(MOE_F32);
    memcpy(state, ck_.file + ck_.state_at, ck_.state_len < sizeof state ? ck_.state_len : sizeof state);
    state[40] = state[41] = state[42] = state[43] = 0xFF; /* moment dtype: none */
    ck_begin(&ck_, &out, state, ck_.state_len, (uint32_t)ck_.n);
    for (i = 0; i < ck_.n; i++) bb_put(&out, ck_.rec[i].at, ck_.rec[i].len);
    return ck_finish_load(ctx, &ck_, &out, MOE_I32);
}
CASE(ckpt_moment_of_a_buffer) { /* moments for the expert bias, which no optimizer updates */
    bi_bytes out;
    int i;
    CK_SETUP(MOE_F32);
    ck_begin(&ck_, &out, NULL, 0, (uint32_t)ck_.n + 2);
    for (i = 0; i < ck_.n; i++) {
        const bi_ck_rec *r = &ck_.rec[i];
        bb_put(&out, r->at, r->len);
        if (i == ck_.expert_bias) {
            ck_put_record(&out, r->name, 1, 0, r->ndim, r->dims, NULL, (size_t)r->numel * 4);
            ck_put_record(&out, r->name, 2, 0, r->ndim, r->dims, NULL, (size_t)r->numel * 4);
        }
    }
    return ck_finish_load(ctx, &ck_, &out, MOE_F32);
}
CASE(ckpt_moment_dtype_code_unknown) {
    bi_bytes out;
    unsigned char state[64];
    int i;
    CK_SETUP(MOE_F32);
    memcpy(state, ck_.file + ck_.state_at, ck_.state_len < sizeof state ? ck_.state_len : sizeof state);
    state[40] = 7; /* neither 0 (f32), 1 (bf16) nor all ones (none) */
    ck_begin(&ck_, &out, state, ck_.state_len, (uint32_t)ck_.n);
    for (i = 0; i < ck_.n; i++) bb_put(&out, ck_.rec[i].at, ck_.rec[i].len);
    return ck_finish_load(ctx, &ck_, &out, MOE_I32);
}
CASE(ckpt_record_count_one_more) {
    bi_bytes out;
    int i;
    CK_SETUP(MOE_I32);
    ck_begin(&ck_, &out, NULL, 0, (uint32_t)ck_.n + 1);
    for (i = 0; i < ck_.n; i++) bb_put(&out, ck_.rec[i].at, ck_.rec[i].len);
    return ck_finish_load(ctx, &ck_, &out, MOE_I32);
}
CASE(ckpt_bytes_after_records) {
    bi_bytes out;
    int i;
    CK_SETUP(MOE_I32);
    ck_begin(&ck_, &out, NULL, 0, (uint32_t)ck_.n);
    for (i = 0; i < ck_.n; i++) bb_put(&out, ck_.rec[i].at, ck_.rec[i].len);
    bb_u32(&out, 0);
    return ck_finish_load(ctx, &ck_, &out, MOE_I32);
}
/* State fields out of range: a negative step, data index or optimizer step count. */
static moe_status ck_state_field(moe_ctx *ctx, size_t offset, uint64_t value, moe_dtype moments) {
    bi_bytes out;
    unsigned char state[4096];
    int i;
    CK_SETUP(moments);
    if (ck_.state_len > sizeof state) { bi_flag("state block too long for the test"); free(ck_.file); return MOE_ERR_IO; }
    memcpy(state, ck_.file + ck_.state_at, ck_.state_len);
    put_u64le(state + offset, value);
    ck_begin(&ck_, &out, state, ck_.state_len, (uint32_t)ck_.n);
    for (i = 0; i < ck_.n; i++) bb_put(&out, ck_.rec[i].at, ck_.rec[i].len);
    return ck_finish_load(ctx, &ck_, &out, moments);
}
CASE(ckpt_step_negative) { return ck_state_field(ctx, 0, (uint64_t)-5, MOE_I32); }
CASE(ckpt_data_index_negative) { return ck_state_field(ctx, 16, (uint64_t)-1, MOE_I32); }
CASE(ckpt_tokens_seen_nan) { return ck_state_field(ctx, 24, 0x7FF8000000000000ull, MOE_I32); }
CASE(ckpt_optimizer_steps_negative) { return ck_state_field(ctx, 32, (uint64_t)-3, MOE_F32); }
CASE(ckpt_total_steps_negative) { return ck_state_field(ctx, 44, (uint64_t)-1, MOE_I32); }
CASE(ckpt_skipped_negative) { return ck_state_field(ctx, 52, (uint64_t)-2, MOE_I32); }
CASE(ckpt_user_values_over_max) { return ck_state_field(ctx, 60, MOE_TRAIN_USER_MAX + 1, MOE_I32); }
CASE(ckpt_version_3) {
    bi_bytes out;
    int i;
    CK_SETUP(MOE_I32);
    ck_begin(&ck_, &out, NULL, 0, (uint32_t)ck_.n);
    for (i = 0; i < ck_.n; i++) bb_put(&out, ck_.rec[i].at, ck_.rec[i].len);
    if (out.len > 12) out.p[8] = 3;
    return ck_finish_load(ctx, &ck_, &out, MOE_I32);
}
CASE(ckpt_save_user_values_over_max) {
    moe_config cfg = hf_small_config();
    moe_model *m = NULL;
    moe_train_state *st = (moe_train_state *)calloc(1, sizeof *st);
    moe_status s = MOE_ERR_MEMORY;
    if (st) need(ctx, moe_model_new(ctx, &cfg, 1, &m), "moe_model_new");
    if (m) {
        st->n_user = MOE_TRAIN_USER_MAX + 1;
        s = moe_ckpt_save(ctx, ck_path(), m, NULL, st);
    }
    remove(ck_path());
    moe_model_free(ctx, m);
    free(st);
    return s;
}
static moe_status ck_save_step(moe_ctx *ctx, const char *dir, const char *prefix, int keep) {
    moe_config cfg = hf_small_config();
    moe_model *m = NULL;
    moe_train_state st;
    moe_status s = MOE_ERR_MEMORY;
    memset(&st, 0, sizeof st);
    need(ctx, moe_model_new(ctx, &cfg, 1, &m), "moe_model_new");
    if (m) s = moe_ckpt_save_step(ctx, dir, prefix, keep, m, NULL, &st, NULL, 0);
    moe_model_free(ctx, m);
    return s;
}
CASE(ckpt_save_step_null_dir) { return ck_save_step(ctx, NULL, "ckpt", 1); }
CASE(ckpt_save_step_empty_prefix) { return ck_save_step(ctx, "build", "", 1); }
CASE(ckpt_save_step_prefix_with_slash) { return ck_save_step(ctx, "build", "a/b", 1); }
CASE(ckpt_save_step_negative_keep) { return ck_save_step(ctx, "build", "bi_ckpt", -1); }
CASE(ckpt_save_step_missing_dir) { return ck_save_step(ctx, "build/bi_no_such_dir", "ckpt", 1); }
CASE(ckpt_latest_missing_dir) {
    char path[256];
    return moe_ckpt_latest(ctx, "build/bi_no_such_dir", "ckpt", path, sizeof path);
}
CASE(ckpt_latest_null_path) { return moe_ckpt_latest(ctx, "build", "ckpt", NULL, 0); }
CASE(ckpt_clean_missing_dir) { return moe_ckpt_clean(ctx, "build/bi_no_such_dir", "ckpt", -1, NULL); }

/* ============================================================================================
   The table
   ============================================================================================ */

typedef moe_status (*bi_fn)(moe_ctx *ctx);
typedef struct bi_case {
    const char *name;
    bi_fn fn;
    moe_status expect;
    const char *msg_has; /* the message must contain this (NULL: any non-empty message) */
    const char *msg_has2; /* ... and this too (NULL: nothing more) */
    int null_ctx;        /* the call gets a NULL context: check moe_ctx_error(NULL) */
} bi_case;

#define E(fn, status, msg) {#fn, fn, status, msg, NULL, 0}
#define E2(fn, status, msg, msg2) {#fn, fn, status, msg, msg2, 0}
#define N(fn, status) {#fn, fn, status, NULL, NULL, 1}

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

    E2(ckpt_moment_labelled_f32_in_bf16_file, MOE_ERR_FORMAT, "moe_ckpt_load", "labelled f32"),
    E2(ckpt_moment_labelled_bf16_in_f32_file, MOE_ERR_FORMAT, "moe_ckpt_load", "labelled bf16"),
    E2(ckpt_moment_labelled_f32_load_without_optimizer, MOE_ERR_FORMAT, "moe_ckpt_load", "labelled f32"),
    E2(ckpt_value_labelled_bf16, MOE_ERR_FORMAT, "moe_ckpt_load", "dtype"),
    E2(ckpt_record_dtype_unknown, MOE_ERR_FORMAT, "moe_ckpt_load", "dtype"),
    E2(ckpt_record_kind_unknown, MOE_ERR_FORMAT, "moe_ckpt_load", "kind"),
    E2(ckpt_record_shape_transposed, MOE_ERR_FORMAT, "moe_ckpt_load", "shape"),
    E2(ckpt_record_ndim_zero, MOE_ERR_FORMAT, "moe_ckpt_load", "shape"),
    E2(ckpt_record_unknown_name, MOE_ERR_FORMAT, "moe_ckpt_load", "'model.bogus.weight'"),
    E2(ckpt_tensor_twice_other_missing, MOE_ERR_FORMAT, "moe_ckpt_load", "twice"),
    E2(ckpt_tensor_missing, MOE_ERR_FORMAT, "moe_ckpt_load", "misses"),
    E2(ckpt_expert_bias_missing, MOE_ERR_FORMAT, "moe_ckpt_load", "e_score_correction_bias"),
    E2(ckpt_moment_twice_other_missing, MOE_ERR_FORMAT, "moe_ckpt_load", "twice"),
    E2(ckpt_moment_missing, MOE_ERR_FORMAT, "moe_ckpt_load", "misses"),
    E2(ckpt_moment_missing_load_without_optimizer, MOE_ERR_FORMAT, "moe_ckpt_load", "misses"),
    E2(ckpt_moments_announced_none_held, MOE_ERR_FORMAT, "moe_ckpt_load", "misses"),
    E2(ckpt_moments_held_none_announced, MOE_ERR_FORMAT, "moe_ckpt_load", "no optimizer"),
    E2(ckpt_moment_of_a_buffer, MOE_ERR_FORMAT, "moe_ckpt_load", "not a trained parameter"),
    E2(ckpt_moment_dtype_code_unknown, MOE_ERR_FORMAT, "moe_ckpt_load", "moment dtype"),
    E2(ckpt_record_count_one_more, MOE_ERR_FORMAT, "moe_ckpt_load", "truncated"),
    E2(ckpt_bytes_after_records, MOE_ERR_FORMAT, "moe_ckpt_load", "after the last"),
    E2(ckpt_step_negative, MOE_ERR_FORMAT, "moe_ckpt_load", "step"),
    E2(ckpt_data_index_negative, MOE_ERR_FORMAT, "moe_ckpt_load", "data index"),
    E2(ckpt_tokens_seen_nan, MOE_ERR_FORMAT, "moe_ckpt_load", "tokens"),
    E2(ckpt_optimizer_steps_negative, MOE_ERR_FORMAT, "moe_ckpt_load", "optimizer steps"),
    E2(ckpt_total_steps_negative, MOE_ERR_FORMAT, "moe_ckpt_load", "total steps (-1)"),
    E2(ckpt_skipped_negative, MOE_ERR_FORMAT, "moe_ckpt_load", "skipped steps (-2)"),
    E2(ckpt_user_values_over_max, MOE_ERR_FORMAT, "moe_ckpt_load", "user state values"),
    E2(ckpt_version_3, MOE_ERR_FORMAT, "moe_ckpt_load", "version 3"),
    E2(ckpt_save_user_values_over_max, MOE_ERR_ARG, "moe_ckpt_save", "n_user"),
    E(ckpt_save_step_null_dir, MOE_ERR_ARG, "moe_ckpt_save_step"),
    E(ckpt_save_step_empty_prefix, MOE_ERR_ARG, "moe_ckpt_save_step"),
    E2(ckpt_save_step_prefix_with_slash, MOE_ERR_ARG, "moe_ckpt_save_step", "'/'"),
    E2(ckpt_save_step_negative_keep, MOE_ERR_ARG, "moe_ckpt_save_step", "keep"),
    E2(ckpt_save_step_missing_dir, MOE_ERR_IO, "moe_ckpt_save", "bi_no_such_dir"),
    E2(ckpt_latest_missing_dir, MOE_ERR_IO, "moe_ckpt_latest", "bi_no_such_dir"),
    E(ckpt_latest_null_path, MOE_ERR_ARG, "moe_ckpt_latest"),
    E2(ckpt_clean_missing_dir, MOE_ERR_IO, "moe_ckpt_clean", "bi_no_such_dir"),

    E2(st_mem_empty, MOE_ERR_FORMAT, "moe_st_open", "too short"),
    E2(st_mem_7_bytes, MOE_ERR_FORMAT, "moe_st_open", "too short"),
    E2(st_file_empty, MOE_ERR_FORMAT, "moe_st_open", "too short"),
    E2(st_file_5_bytes, MOE_ERR_FORMAT, "moe_st_open", "too short"),
    E2(st_header_cut_short, MOE_ERR_FORMAT, "moe_st_open", "header length"),
    E2(st_file_header_cut_short, MOE_ERR_FORMAT, "moe_st_open", "header length"),
    E2(st_header_len_one_past_file, MOE_ERR_FORMAT, "moe_st_open", "header length"),
    E2(st_header_len_2_63, MOE_ERR_FORMAT, "moe_st_open", "header length"),
    E2(st_header_len_all_ones, MOE_ERR_FORMAT, "moe_st_open", "header length"),
    E2(st_header_len_zero, MOE_ERR_FORMAT, "moe_st_open", "JSON"),
    E2(st_header_over_100mb, MOE_ERR_FORMAT, "moe_st_open", "100 MB"),
    E2(st_json_unterminated_string, MOE_ERR_FORMAT, "moe_st_open", "JSON"),
    E2(st_json_trailing_comma_object, MOE_ERR_FORMAT, "moe_st_open", "JSON"),
    E2(st_json_trailing_comma_array, MOE_ERR_FORMAT, "moe_st_open", "JSON"),
    E2(st_json_bad_escape, MOE_ERR_FORMAT, "moe_st_open", "JSON"),
    E2(st_json_bad_unicode_escape, MOE_ERR_FORMAT, "moe_st_open", "JSON"),
    E2(st_json_bare_word, MOE_ERR_FORMAT, "moe_st_open", "JSON"),
    E2(st_json_unquoted_key, MOE_ERR_FORMAT, "moe_st_open", "JSON"),
    E2(st_json_single_quotes, MOE_ERR_FORMAT, "moe_st_open", "JSON"),
    E2(st_json_leading_zero, MOE_ERR_FORMAT, "moe_st_open", "JSON"),
    E2(st_json_raw_newline_in_string, MOE_ERR_FORMAT, "moe_st_open", "JSON"),
    E2(st_json_text_after_object, MOE_ERR_FORMAT, "moe_st_open", "JSON"),
    E2(st_json_nul_byte, MOE_ERR_FORMAT, "moe_st_open", "JSON"),
    E2(st_json_deep_nesting, MOE_ERR_FORMAT, "moe_st_open", "nesting"),
    E2(st_file_invalid_json, MOE_ERR_FORMAT, "moe_st_open", "JSON"),
    E2(st_header_array, MOE_ERR_FORMAT, "moe_st_open", "object"),
    E2(st_header_string, MOE_ERR_FORMAT, "moe_st_open", "object"),
    E2(st_header_null, MOE_ERR_FORMAT, "moe_st_open", "object"),
    E2(st_entry_array, MOE_ERR_FORMAT, "moe_st_open", "'a'"),
    E2(st_entry_string, MOE_ERR_FORMAT, "moe_st_open", "'a'"),
    E2(st_missing_dtype, MOE_ERR_FORMAT, "moe_st_open", "dtype"),
    E2(st_missing_shape, MOE_ERR_FORMAT, "moe_st_open", "shape"),
    E2(st_missing_data_offsets, MOE_ERR_FORMAT, "moe_st_open", "data_offsets"),
    E2(st_dtype_not_string, MOE_ERR_FORMAT, "moe_st_open", "dtype"),
    E2(st_shape_not_array, MOE_ERR_FORMAT, "moe_st_open", "shape"),
    E2(st_data_offsets_three, MOE_ERR_FORMAT, "moe_st_open", "data_offsets"),
    E2(st_dtype_unknown, MOE_ERR_FORMAT, "moe_st_open", "Q4_K"),
    E2(st_dtype_lowercase, MOE_ERR_FORMAT, "moe_st_open", "f32"),
    E2(st_shape_negative_dim, MOE_ERR_FORMAT, "moe_st_open", "shape"),
    E2(st_shape_fractional_dim, MOE_ERR_FORMAT, "moe_st_open", "shape"),
    E2(st_shape_string_dim, MOE_ERR_FORMAT, "moe_st_open", "shape"),
    E2(st_shape_1e300_dim, MOE_ERR_FORMAT, "moe_st_open", "shape"),
    E2(st_shape_numel_overflow, MOE_ERR_FORMAT, "moe_st_open", "shape"),
    E2(st_shape_bytes_overflow, MOE_ERR_FORMAT, "moe_st_open", "'a'"),
    E2(st_shape_9_dims, MOE_ERR_FORMAT, "moe_st_open", "dims"),
    E2(st_offsets_reversed, MOE_ERR_FORMAT, "moe_st_open", "data_offsets"),
    E2(st_offsets_negative, MOE_ERR_FORMAT, "moe_st_open", "data_offsets"),
    E2(st_offsets_fractional, MOE_ERR_FORMAT, "moe_st_open", "data_offsets"),
    E2(st_offsets_beyond_data, MOE_ERR_FORMAT, "moe_st_open", "data_offsets"),
    E2(st_offsets_huge, MOE_ERR_FORMAT, "moe_st_open", "data_offsets"),
    E2(st_bytes_mismatch, MOE_ERR_FORMAT, "moe_st_open", "bytes"),
    E2(st_bytes_mismatch_bf16, MOE_ERR_FORMAT, "moe_st_open", "bytes"),
    E2(st_tensors_overlap, MOE_ERR_FORMAT, "moe_st_open", "overlaps"),
    E2(st_tensors_same_range, MOE_ERR_FORMAT, "moe_st_open", "overlaps"),
    E2(st_tensors_gap, MOE_ERR_FORMAT, "moe_st_open", "gap"),
    E2(st_gap_at_start, MOE_ERR_FORMAT, "moe_st_open", "gap"),
    E2(st_data_left_over, MOE_ERR_FORMAT, "moe_st_open", "not covered"),
    E2(st_file_data_left_over, MOE_ERR_FORMAT, "moe_st_open", "not covered"),
    E2(st_data_without_tensors, MOE_ERR_FORMAT, "moe_st_open", "not covered"),
    E2(st_duplicate_name, MOE_ERR_FORMAT, "moe_st_open", "twice"),
    E2(st_duplicate_name_escaped, MOE_ERR_FORMAT, "moe_st_open", "twice"),
    E2(st_name_with_nul_escape, MOE_ERR_FORMAT, "moe_st_open", NULL),
    E2(st_name_too_long, MOE_ERR_FORMAT, "moe_st_open", "name"),
    E2(st_metadata_number_value, MOE_ERR_FORMAT, "moe_st_open", "__metadata__"),
    E2(st_metadata_object_value, MOE_ERR_FORMAT, "moe_st_open", "__metadata__"),
    E2(st_metadata_not_object, MOE_ERR_FORMAT, "moe_st_open", "__metadata__"),
    E(st_open_null_out, MOE_ERR_ARG, "moe_st_open"),
    E(st_open_null_path, MOE_ERR_ARG, "moe_st_open"),
    E2(st_open_missing_file, MOE_ERR_IO, "moe_st_open", "bi_no_such_file"),
    E(st_open_memory_null_bytes, MOE_ERR_ARG, "moe_st_open_memory"),
    E(st_open_memory_null_out, MOE_ERR_ARG, "moe_st_open_memory"),
    E(st_writer_new_null_out, MOE_ERR_ARG, "moe_st_writer_new"),
    E(st_writer_add_null_writer, MOE_ERR_ARG, "moe_st_writer_add"),
    E(st_writer_add_null_name, MOE_ERR_ARG, "moe_st_writer_add"),
    E(st_writer_add_quote_in_name, MOE_ERR_ARG, "moe_st_writer_add"),
    E(st_writer_add_dtype_count, MOE_ERR_ARG, "moe_st_writer_add"),
    E(st_writer_add_9_dims, MOE_ERR_ARG, "moe_st_writer_add"),
    E(st_writer_add_negative_dim, MOE_ERR_SHAPE, "moe_st_writer_add"),
    E(st_writer_add_bytes_wrap, MOE_ERR_SHAPE, "moe_st_writer_add"),
    E(st_writer_add_bytes_over_half, MOE_ERR_SHAPE, "moe_st_writer_add"),
    E2(st_writer_add_duplicate_name, MOE_ERR_ARG, "moe_st_writer_add", "'a'"),
    E(st_writer_save_null_writer, MOE_ERR_ARG, "moe_st_writer_save"),
    E(st_writer_save_missing_dir, MOE_ERR_IO, "moe_st_writer_save"),

    E2(cfg_experts_per_tok_zero, MOE_ERR_CONFIG, "moe_config_parse", "\"num_experts_per_tok\" = 0 is out of range"),
    E2(cfg_rms_norm_eps_zero, MOE_ERR_CONFIG, "moe_config_parse", "\"rms_norm_eps\" = 0 is out of range"),
    E2(cfg_rms_norm_eps_negative, MOE_ERR_CONFIG, "moe_config_parse", "rms_norm_eps"),
    E2(cfg_rms_norm_eps_overflow, MOE_ERR_CONFIG, "moe_config_parse", "rms_norm_eps"),
    E2(cfg_n_group_zero, MOE_ERR_CONFIG, "moe_config_parse", "\"n_group\" = 0"),
    E2(cfg_topk_group_zero, MOE_ERR_CONFIG, "moe_config_parse", "\"topk_group\" = 0"),
    E2(cfg_hidden_size_zero, MOE_ERR_CONFIG, "moe_config_parse", "\"hidden_size\" = 0"),
    E2(cfg_intermediate_size_zero, MOE_ERR_CONFIG, "moe_config_parse", "\"intermediate_size\" = 0"),
    E2(cfg_routed_scaling_zero, MOE_ERR_CONFIG, "moe_config_parse", "routed_scaling_factor"),
    E2(cfg_initializer_range_zero, MOE_ERR_CONFIG, "moe_config_parse", "initializer_range"),
    E2(cfg_q_lora_rank_zero, MOE_ERR_CONFIG, "moe_config_parse", "\"q_lora_rank\" = 0"),
    E2(cfg_q_lora_rank_1e300, MOE_ERR_CONFIG, "\"q_lora_rank\"", "out of range"),
    E2(cfg_kv_heads_1e300, MOE_ERR_CONFIG, "\"num_key_value_heads\"", "out of range"),
    E2(cfg_kv_heads_differ, MOE_ERR_CONFIG, "moe_config_parse", "num_key_value_heads"),
    E2(cfg_vocab_negative, MOE_ERR_CONFIG, "\"vocab_size\" = -32", "out of range"),
    E2(cfg_vocab_2_pow_64, MOE_ERR_CONFIG, "\"vocab_size\"", "out of range"),
    E2(cfg_layers_fraction, MOE_ERR_CONFIG, "\"num_hidden_layers\" = 2.5", "out of range"),
    E2(cfg_layers_string, MOE_ERR_FORMAT, "\"num_hidden_layers\"", "integer"),
    E2(cfg_layers_null, MOE_ERR_FORMAT, "\"num_hidden_layers\"", "integer"),
    E2(cfg_norm_topk_prob_number, MOE_ERR_FORMAT, "\"norm_topk_prob\"", "true or false"),
    E2(cfg_rope_interleave_null, MOE_ERR_FORMAT, "\"rope_interleave\"", "true or false"),
    E2(cfg_attention_bias_true, MOE_ERR_CONFIG, "moe_config_parse", "attention_bias"),
    E2(cfg_mlp_bias_true, MOE_ERR_CONFIG, "moe_config_parse", "mlp_bias"),
    E2(cfg_attention_dropout, MOE_ERR_CONFIG, "moe_config_parse", "attention_dropout"),
    E2(cfg_moe_layer_freq_2, MOE_ERR_CONFIG, "moe_config_parse", "moe_layer_freq"),
    E2(cfg_partial_rotary_factor, MOE_ERR_CONFIG, "moe_config_parse", "partial_rotary_factor"),
    E2(cfg_hidden_act_gelu, MOE_ERR_CONFIG, "moe_config_parse", "hidden_act"),
    E2(cfg_mtp_alias_disagrees, MOE_ERR_CONFIG, "num_mtp_layers", "num_nextn_predict_layers"),
    E2(cfg_duplicate_key, MOE_ERR_FORMAT, "\"hidden_size\"", "twice"),
    E2(cfg_duplicate_key_escaped, MOE_ERR_FORMAT, "\"hidden_size\"", "twice"),
    E2(cfg_yarn_original_1e300, MOE_ERR_CONFIG, "rope_scaling.original_max_position_embeddings", "out of range"),
    E2(cfg_yarn_factor_below_1, MOE_ERR_CONFIG, "rope_scaling.factor", "out of range"),
    E2(cfg_yarn_no_factor, MOE_ERR_CONFIG, "moe_config_parse", "factor"),
    E2(cfg_yarn_beta_fast_zero, MOE_ERR_CONFIG, "rope_scaling.beta_fast", "out of range"),
    E2(cfg_yarn_mscale_negative, MOE_ERR_CONFIG, "rope_scaling.mscale", "out of range"),
    E2(cfg_yarn_attention_factor, MOE_ERR_CONFIG, "rope_scaling.attention_factor", "not supported"),
    E2(cfg_yarn_truncate_false, MOE_ERR_CONFIG, "rope_scaling.truncate", NULL),
    E2(cfg_yarn_unknown_key, MOE_ERR_CONFIG, "rope_scaling.low_freq_factor", "not supported"),
    E2(cfg_yarn_duplicate_key, MOE_ERR_FORMAT, "\"factor\"", "twice"),
    E2(cfg_rope_type_llama3, MOE_ERR_CONFIG, "moe_config_parse", "llama3"),
    E2(cfg_rope_default_with_factor, MOE_ERR_CONFIG, "rope_scaling.factor", "yarn"),
    E2(cfg_rope_no_type, MOE_ERR_CONFIG, "moe_config_parse", "rope_type"),
    E2(cfg_rope_not_object, MOE_ERR_FORMAT, "moe_config_parse", "rope_scaling"),
    E2(cfg_rope_both_forms, MOE_ERR_CONFIG, "rope_parameters", "rope_scaling"),
    E2(cfg_rope_theta_one, MOE_ERR_CONFIG, "\"rope_theta\" = 1", "out of range"),
    E2(cfg_not_object, MOE_ERR_FORMAT, "moe_config_parse", "object"),
    E(cfg_null_text, MOE_ERR_ARG, "moe_config_parse"),

#if BI_POSIX
    E2(hf_missing_config, MOE_ERR_IO, "moe_model_load_hf", "config.json"),
    E2(hf_config_invalid_json, MOE_ERR_FORMAT, "moe_config_parse", "JSON"),
    E2(hf_config_not_object, MOE_ERR_FORMAT, "moe_config_parse", "object"),
    E2(hf_missing_safetensors, MOE_ERR_IO, "moe_st_open", "model.safetensors"),
    E2(hf_truncated_safetensors, MOE_ERR_FORMAT, "moe_st_open", "model.safetensors"),
    E2(hf_tensor_missing, MOE_ERR_FORMAT, "moe_model_load_hf", "'model.norm.weight'"),
    E2(hf_expert_tensor_missing, MOE_ERR_FORMAT, "moe_model_load_hf", "'model.layers.1.mlp.experts.2.up_proj.weight'"),
    E2(hf_extra_tensor, MOE_ERR_FORMAT, "moe_model_load_hf", "'model.layers.0.mlp.bogus.weight'"),
    E2(hf_wrong_shape, MOE_ERR_FORMAT, "moe_model_load_hf", "'model.layers.1.self_attn.kv_b_proj.weight'"),
    E2(hf_wrong_dtype, MOE_ERR_FORMAT, "moe_model_load_hf", "'model.layers.0.input_layernorm.weight'"),
    E2(hf_fp8_without_scale, MOE_ERR_FORMAT, "moe_model_load_hf", "model.layers.0.self_attn.o_proj.weight_scale_inv"),
    E2(hf_index_dotdot_shard, MOE_ERR_FORMAT, "moe_model_load_hf", "shard"),
    E2(hf_index_absolute_shard, MOE_ERR_FORMAT, "moe_model_load_hf", "shard"),
    E2(hf_index_escaped_dotdot_shard, MOE_ERR_FORMAT, "moe_model_load_hf", "shard"),
    E2(hf_index_no_weight_map, MOE_ERR_FORMAT, "moe_model_load_hf", "weight_map"),
    E2(hf_index_invalid_json, MOE_ERR_FORMAT, "moe_model_load_hf", "JSON"),
    E2(hf_index_missing_shard, MOE_ERR_IO, "moe_st_open", "model-00001-of-00002.safetensors"),
    E2(hf_fused_gate_up_transposed, MOE_ERR_FORMAT, "'model.layers.1.mlp.experts.gate_up_proj'", "shape [4, 16, 8], want [4, 8, 16]"),
    E2(hf_norm_wrong_shape_message, MOE_ERR_FORMAT, "'model.norm.weight'", "has shape [8], want [16]"),
    E2(hf_nan_weight, MOE_ERR_NUMERIC, "'model.norm.weight'", "non-finite"),
    E2(hf_inf_expert_weight, MOE_ERR_NUMERIC, "'model.layers.1.mlp.experts.3.down_proj.weight'", "non-finite"),
    E2(hf_nan_expert_bias, MOE_ERR_NUMERIC, "'model.layers.1.mlp.gate.e_score_correction_bias'", "non-finite"),
    E2(hf_fp8_scale_inf, MOE_ERR_NUMERIC, "'model.layers.0.self_attn.o_proj.weight_scale_inv'", "non-finite"),
    E2(hf_fp8_nan_code, MOE_ERR_NUMERIC, "'model.layers.0.self_attn.o_proj.weight'", "non-finite"),
    E2(hf_fp8_scale_wrong_shape, MOE_ERR_FORMAT, "model.layers.0.self_attn.o_proj.weight_scale_inv", "want F32 [2, 1]"),
    E2(hf_quant_block_zero, MOE_ERR_CONFIG, "weight_block_size", "out of range"),
    E2(hf_quant_block_fraction, MOE_ERR_CONFIG, "weight_block_size", "out of range"),
    E2(hf_quant_block_nonsquare, MOE_ERR_CONFIG, "weight_block_size", "square"),
    E2(hf_quant_block_one_number, MOE_ERR_FORMAT, "weight_block_size", "two integers"),
    E2(hf_quant_method_other, MOE_ERR_CONFIG, "quant_method", "fp8"),
    E2(hf_quant_block_wrong_size, MOE_ERR_FORMAT, "weight_scale_inv", "blocks of 16"),
    E2(hf_config_attention_bias, MOE_ERR_CONFIG, "moe_config_parse", "attention_bias"),
    E2(hf_index_lists_too_few, MOE_ERR_FORMAT, "moe_model_load_hf", "the index lists 1"),
    E2(hf_index_names_absent_tensor, MOE_ERR_FORMAT, "'model.bogus'", "does not hold it"),
    E2(hf_index_duplicate_entry, MOE_ERR_FORMAT, "'model.norm.weight'", "twice"),
    E2(hf_index_shard_not_string, MOE_ERR_FORMAT, "moe_model_load_hf", "shard"),
    E2(hf_safetensors_fifo, MOE_ERR_IO, "model.safetensors", "FIFO"),
    E2(hf_safetensors_directory, MOE_ERR_IO, "model.safetensors", "a directory"),
    E2(hf_config_fifo, MOE_ERR_IO, "config.json", "FIFO"),
    E2(hf_config_directory, MOE_ERR_IO, "config.json", "a directory"),
    E2(hf_index_fifo, MOE_ERR_IO, "model.safetensors.index.json", "FIFO"),
    E2(hf_index_directory, MOE_ERR_IO, "model.safetensors.index.json", "a directory"),
    E2(st_open_fifo, MOE_ERR_IO, "moe_st_open", "FIFO"),
    E2(st_open_directory, MOE_ERR_IO, "moe_st_open", "a directory, not a regular file"),
    E2(config_load_fifo, MOE_ERR_IO, "moe_config_load", "FIFO"),
    E2(data_load_fifo, MOE_ERR_IO, "moe_data_load", "FIFO"),
    E2(data_load_directory, MOE_ERR_IO, "moe_data_load", "a directory"),
    E2(distill_cache_fifo, MOE_ERR_IO, "moe_distill_cache_open", "FIFO"),
    E2(distill_cache_directory, MOE_ERR_IO, "moe_distill_cache_open", "a directory"),
    E2(distill_cache_huge_vocab, MOE_ERR_FORMAT, "moe_distill_cache_read", "repeated token id"),
    E(hf_null_dir, MOE_ERR_ARG, "moe_model_load_hf"),
    E(hf_null_out, MOE_ERR_ARG, "moe_model_load_hf"),
    E2(hf_missing_dir, MOE_ERR_IO, "moe_model_load_hf", "bi_no_such_dir"),
    E(hf_save_null_model, MOE_ERR_ARG, "moe_model_save_hf"),
    E(hf_save_missing_dir, MOE_ERR_IO, "bi_no_such_dir"),
#endif
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
        if (c->msg_has2)
            T_CHECK(strstr(msg, c->msg_has2) != NULL, "message does not mention \"%s\"", c->msg_has2);
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


/* A well-formed file written by moe_st_writer reads back equal: every dtype, a scalar, an
   empty tensor and an empty name; from a file and from memory. Hand-written headers that are
   unusual but valid (__metadata__, tensors listed out of offset order, padding) open too. */
static void run_st_roundtrip_accepted(void) {
    moe_ctx *ctx = NULL;
    moe_st_writer *w = NULL;
    moe_st_file *f = NULL;
    moe_status s;
    char path[256];
    static const float f32[6] = {1.5f, -2.0f, 0.25f, 3.0e-5f, -7.0f, 1.0e30f};
    static const uint16_t bf16[4] = {0x3F80, 0xC000, 0x0000, 0x3E80}; /* 1, -2, 0, 0.25 */
    static const uint16_t f16[4] = {0x3C00, 0xC000, 0x3400, 0x7BFF};  /* 1, -2, 0.25, 65504 */
    static const uint8_t e4m3[3] = {0x38, 0xC0, 0x7E};                 /* 1, -2, 448 */
    static const uint8_t e5m2[2] = {0x3C, 0xC0};                       /* 1, -2 */
    static const int32_t i32[3] = {7, -1, 2147483647};
    static const int64_t i64[2] = {-5, (int64_t)1 << 62};
    static const float scalar = 42.0f;
    static const float want_bf16[4] = {1, -2, 0, 0.25f}, want_f16[4] = {1, -2, 0.25f, 65504}, want_e4m3[3] = {1, -2, 448},
                       want_e5m2[2] = {1, -2};
    int64_t sh23[2] = {2, 3}, sh4[1] = {4}, sh22[2] = {2, 2}, sh3[1] = {3}, sh2[1] = {2}, sh05[2] = {0, 5};
    int pass;
    T_ASSERT(moe_ctx_new(&ctx) == MOE_OK, "moe_ctx_new failed");
    snprintf(path, sizeof path, "build/bi_rt_%ld.safetensors", bi_pid());
    s = moe_st_writer_new(ctx, &w);
    T_ASSERT(s == MOE_OK, "moe_st_writer_new: %s", moe_ctx_error(ctx));
#define ADD(nm, dt, nd, sh, p)                                                                  \
    s = moe_st_writer_add(ctx, w, nm, dt, nd, sh, p);                                            \
    T_CHECK(s == MOE_OK, "moe_st_writer_add %s: %s (%s)", nm, moe_status_name(s), moe_ctx_error(ctx))
    ADD("w.f32", MOE_ST_F32, 2, sh23, f32);
    ADD("w.bf16", MOE_ST_BF16, 1, sh4, bf16);
    ADD("w.f16", MOE_ST_F16, 2, sh22, f16);
    ADD("w.e4m3", MOE_ST_F8_E4M3, 1, sh3, e4m3);
    ADD("w.e5m2", MOE_ST_F8_E5M2, 1, sh2, e5m2);
    ADD("w.i32", MOE_ST_I32, 1, sh3, i32);
    ADD("w.i64", MOE_ST_I64, 1, sh2, i64);
    ADD("scalar", MOE_ST_F32, 0, NULL, &scalar);
    ADD("empty", MOE_ST_F32, 2, sh05, f32);
    ADD("", MOE_ST_F32, 1, sh2, f32); /* an empty name: the format does not forbid it */
#undef ADD
    s = moe_st_writer_save(ctx, w, path);
    T_CHECK(s == MOE_OK, "moe_st_writer_save: %s (%s)", moe_status_name(s), moe_ctx_error(ctx));
    moe_st_writer_free(w);
    for (pass = 0; pass < 2 && s == MOE_OK; pass++) {
        const moe_st_tensor *t;
        int64_t i;
        f = NULL;
        if (pass == 0) {
            s = moe_st_open(ctx, path, &f);
        } else { /* the same bytes from memory */
            FILE *fp = fopen(path, "rb");
            unsigned char buf[4096];
            size_t n = fp ? fread(buf, 1, sizeof buf, fp) : 0;
            if (fp) fclose(fp);
            T_CHECK(n > 8 && n < sizeof buf, "reading %s back: %zu bytes", path, n);
            s = moe_st_open_memory(ctx, buf, n, &f);
            memset(buf, 0xEE, sizeof buf); /* the file must have copied them */
        }
        T_CHECK(s == MOE_OK, "%s: %s (%s)", pass ? "moe_st_open_memory" : "moe_st_open", moe_status_name(s), moe_ctx_error(ctx));
        if (s != MOE_OK) break;
        T_CHECK(moe_st_count(f) == 10, "count %lld, want 10", (long long)moe_st_count(f));
        T_CHECK(moe_st_find(f, "nope") == NULL && moe_st_find(f, NULL) == NULL && moe_st_find(NULL, "w.f32") == NULL,
                "moe_st_find finds what is not there");
        T_CHECK(moe_st_get(f, -1) == NULL && moe_st_get(f, 10) == NULL, "moe_st_get out of range is not NULL");
        t = moe_st_find(f, "w.f32");
        T_CHECK(t && t->dtype == MOE_ST_F32 && t->ndim == 2 && t->shape[0] == 2 && t->shape[1] == 3 && t->numel == 6 &&
                    t->bytes == 24, "w.f32 header wrong");
        if (t) {
            for (i = 0; i < 6; i++) T_CHECK(moe_st_value(t, i) == f32[i], "w.f32[%lld] = %g, want %g", (long long)i, moe_st_value(t, i), f32[i]);
            T_CHECK(memcmp(t->data, f32, 24) == 0, "w.f32 bytes differ");
            T_CHECK(isnan(moe_st_value(t, 6)) && isnan(moe_st_value(t, -1)), "moe_st_value out of range is not NaN");
        }
        t = moe_st_find(f, "w.bf16");
        T_CHECK(t && t->dtype == MOE_ST_BF16 && t->numel == 4, "w.bf16 header wrong");
        for (i = 0; t && i < 4; i++) T_CHECK(moe_st_value(t, i) == want_bf16[i], "w.bf16[%lld] = %g", (long long)i, moe_st_value(t, i));
        t = moe_st_find(f, "w.f16");
        T_CHECK(t && t->dtype == MOE_ST_F16 && t->ndim == 2 && t->numel == 4, "w.f16 header wrong");
        for (i = 0; t && i < 4; i++) T_CHECK(moe_st_value(t, i) == want_f16[i], "w.f16[%lld] = %g", (long long)i, moe_st_value(t, i));
        t = moe_st_find(f, "w.e4m3");
        T_CHECK(t && t->dtype == MOE_ST_F8_E4M3 && t->numel == 3 && t->bytes == 3, "w.e4m3 header wrong");
        for (i = 0; t && i < 3; i++) T_CHECK(moe_st_value(t, i) == want_e4m3[i], "w.e4m3[%lld] = %g", (long long)i, moe_st_value(t, i));
        t = moe_st_find(f, "w.e5m2");
        T_CHECK(t && t->dtype == MOE_ST_F8_E5M2 && t->numel == 2, "w.e5m2 header wrong");
        for (i = 0; t && i < 2; i++) T_CHECK(moe_st_value(t, i) == want_e5m2[i], "w.e5m2[%lld] = %g", (long long)i, moe_st_value(t, i));
        t = moe_st_find(f, "w.i32");
        T_CHECK(t && t->dtype == MOE_ST_I32 && t->numel == 3 && t->bytes == 12 && memcmp(t->data, i32, 12) == 0, "w.i32 differs");
        if (t) T_CHECK(isnan(moe_st_value(t, 0)), "moe_st_value of I32 is not NaN");
        t = moe_st_find(f, "w.i64");
        T_CHECK(t && t->dtype == MOE_ST_I64 && t->numel == 2 && t->bytes == 16 && memcmp(t->data, i64, 16) == 0, "w.i64 differs");
        t = moe_st_find(f, "scalar");
        T_CHECK(t && t->ndim == 0 && t->numel == 1 && t->bytes == 4 && moe_st_value(t, 0) == 42.0f, "scalar differs");
        t = moe_st_find(f, "empty");
        T_CHECK(t && t->ndim == 2 && t->shape[0] == 0 && t->shape[1] == 5 && t->numel == 0 && t->bytes == 0, "empty differs");
        t = moe_st_find(f, "");
        T_CHECK(t && t->numel == 2 && moe_st_value(t, 1) == -2.0f, "the empty-named tensor differs");
        moe_st_close(f);
    }
    remove(path);
    {   /* valid but unusual: __metadata__ first, offsets out of order, space padding, an empty tensor at the end */
        static const char h[] = "{\"__metadata__\":{\"format\":\"pt\",\"note\":\"\\u00e9\\n\"},"
                                "\"b\":{\"dtype\":\"I32\",\"shape\":[1],\"data_offsets\":[4,8]},"
                                "\"a\":{\"data_offsets\":[0,4],\"shape\":[2],\"dtype\":\"BF16\"},"
                                "\"z\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,8]}}    ";
        size_t len;
        unsigned char *img = st_image(h, sizeof h - 1, sizeof h - 1, 8, &len);
        T_ASSERT(img, "out of memory");
        f = NULL;
        s = moe_st_open_memory(ctx, img, len, &f);
        free(img);
        T_CHECK(s == MOE_OK, "a valid hand-written header: %s (%s)", moe_status_name(s), moe_ctx_error(ctx));
        if (s == MOE_OK) {
            T_CHECK(moe_st_count(f) == 3, "count %lld, want 3 (no __metadata__ tensor)", (long long)moe_st_count(f));
            T_CHECK(moe_st_find(f, "__metadata__") == NULL, "__metadata__ is listed as a tensor");
            T_CHECK(moe_st_find(f, "a") && moe_st_find(f, "b") && moe_st_find(f, "z"), "a tensor is missing");
            moe_st_close(f);
        }
    }
    T_CHECK(!g_setup_err[0], "%s", g_setup_err);
    moe_ctx_free(ctx);
}

#if BI_POSIX
/* A model saved with moe_model_save_hf loads back with every tensor equal (F32), and an FP8
   save (8x8 blocks) loads too. */
static void run_hf_roundtrip_accepted(void) {
    moe_ctx *ctx = NULL;
    moe_model *a = NULL, *b = NULL;
    moe_config c = hf_small_config();
    moe_hf_save_opts o;
    moe_status s;
    int64_t i, k, bad = 0;
    T_ASSERT(moe_ctx_new(&ctx) == MOE_OK, "moe_ctx_new failed");
    g_setup_err[0] = 0;
    snprintf(g_hfdir, sizeof g_hfdir, "build/bi_hf_%ld", bi_pid());
    mkdir(g_hfdir, 0777);
    s = moe_model_new(ctx, &c, 11, &a);
    T_CHECK(s == MOE_OK, "moe_model_new: %s", moe_ctx_error(ctx));
    if (s == MOE_OK) s = moe_model_save_hf(ctx, a, g_hfdir, NULL);
    T_CHECK(s == MOE_OK, "moe_model_save_hf: %s (%s)", moe_status_name(s), moe_ctx_error(ctx));
    if (s == MOE_OK) s = moe_model_load_hf(ctx, g_hfdir, &b);
    T_CHECK(s == MOE_OK, "moe_model_load_hf: %s (%s)", moe_status_name(s), moe_ctx_error(ctx));
    if (s == MOE_OK) {
        T_CHECK(moe_model_tensor_count(a) == moe_model_tensor_count(b), "tensor counts differ");
        for (i = 0; i < moe_model_tensor_count(a) && i < moe_model_tensor_count(b); i++) {
            const char *na = NULL, *nb = NULL;
            moe_tensor *ta = moe_model_tensor(a, i, &na, NULL), *tb = moe_model_tensor(b, i, &nb, NULL);
            if (!ta || !tb || strcmp(na, nb) != 0 || ta->numel != tb->numel) { bad++; continue; }
            for (k = 0; k < ta->numel; k++)
                if (moe_tensor_get(ta, k) != moe_tensor_get(tb, k)) { bad++; break; }
        }
        T_CHECK(bad == 0, "%lld tensors differ after the round trip", (long long)bad);
    }
    moe_model_free(ctx, b);
    b = NULL;
    memset(&o, 0, sizeof o);
    o.fp8 = 1;
    o.fp8_block = 8;
    if (a) {
        s = moe_model_save_hf(ctx, a, g_hfdir, &o);
        T_CHECK(s == MOE_OK, "moe_model_save_hf (fp8): %s (%s)", moe_status_name(s), moe_ctx_error(ctx));
        if (s == MOE_OK) s = moe_model_load_hf(ctx, g_hfdir, &b);
        T_CHECK(s == MOE_OK, "moe_model_load_hf (fp8): %s (%s)", moe_status_name(s), moe_ctx_error(ctx));
    }
    moe_model_free(ctx, b);
    moe_model_free(ctx, a);
    hf_clean();
    moe_ctx_free(ctx);
}
#endif

#if BI_POSIX
/* A fused expert stack [E, 2I, H] (transformers 5's in-memory layout) loads as the per-expert
   tensors it holds; and config.json forms transformers accepts are accepted with their meaning. */
static void run_hf_fused_accepted(void) {
    moe_ctx *ctx = NULL;
    moe_model *a = NULL, *b = NULL;
    moe_status s;
    moe_config c;
    int64_t i, k, bad = 0;
    T_ASSERT(moe_ctx_new(&ctx) == MOE_OK, "moe_ctx_new failed");
    g_setup_err[0] = 0;
    T_ASSERT(hf_make_cfg(ctx, hf_fused_config(), NULL), "%s", g_setup_err);
    s = moe_model_load_hf(ctx, g_hfdir, &a);
    T_CHECK(s == MOE_OK, "per-expert load: %s", moe_ctx_error(ctx));
    g_fused_transposed = 0;
    T_CHECK(hf_edit(ctx, edit_drop_layer1_gate_up, extra_fused_gate_up), "rewrite: %s", g_setup_err);
    s = moe_model_load_hf(ctx, g_hfdir, &b);
    T_CHECK(s == MOE_OK, "fused load: %s", moe_ctx_error(ctx));
    for (i = 0; a && b && i < moe_model_tensor_count(a); i++) {
        moe_tensor *ta = moe_model_tensor(a, i, NULL, NULL), *tb = moe_model_tensor(b, i, NULL, NULL);
        for (k = 0; k < ta->numel; k++)
            if (moe_tensor_get(ta, k) != moe_tensor_get(tb, k)) { bad++; break; }
    }
    T_CHECK(a && b && bad == 0, "%lld tensors differ between the fused and the per-expert file", (long long)bad);
    moe_model_free(ctx, a);
    moe_model_free(ctx, b);
    hf_clean();
    {   /* absent mscale fields, null num_key_value_heads, rope_interleave false, explicit defaults */
        char buf[4096];
        cfg_json(buf, sizeof buf, "rope_scaling", "{\"rope_type\": \"yarn\", \"factor\": 4}");
        s = moe_config_parse(ctx, buf, strlen(buf), &c);
        T_CHECK(s == MOE_OK && c.rope_scaling.factor == 4 && c.rope_scaling.mscale == 0 && c.rope_scaling.mscale_all_dim == 0 &&
                    c.rope_scaling.original_max_pos == 16 && c.rope_scaling.beta_fast == 32 && c.rope_scaling.beta_slow == 1,
                "YaRN without mscale fields: %s", moe_ctx_error(ctx));
        cfg_json(buf, sizeof buf, "num_key_value_heads", "null");
        T_CHECK(moe_config_parse(ctx, buf, strlen(buf), &c) == MOE_OK, "num_key_value_heads null: %s", moe_ctx_error(ctx));
        cfg_json(buf, sizeof buf, "rope_interleave", "false");
        s = moe_config_parse(ctx, buf, strlen(buf), &c);
        T_CHECK(s == MOE_OK && c.rope_layout == MOE_ROPE_HALVES, "rope_interleave false: %s", moe_ctx_error(ctx));
        cfg_json(buf, sizeof buf, "q_lora_rank", "null");
        s = moe_config_parse(ctx, buf, strlen(buf), &c);
        T_CHECK(s == MOE_OK && c.q_lora_rank == 0, "q_lora_rank null: %s", moe_ctx_error(ctx));
        cfg_json(buf, sizeof buf, "rope_scaling", "null");
        s = moe_config_parse(ctx, buf, strlen(buf), &c);
        T_CHECK(s == MOE_OK && c.rope_scaling.factor == 0, "rope_scaling null: %s", moe_ctx_error(ctx));
        cfg_json(buf, sizeof buf, "num_mtp_layers", "1");
        T_CHECK(moe_config_parse(ctx, buf, strlen(buf), &c) == MOE_OK, "num_mtp_layers alias: %s", moe_ctx_error(ctx));
        {   /* the keys of DeepSeek-V3's config.json on the hub (auto_map, ep_size, seq_aux, ...: ignored) */
            static const char v3[] =
                "{\"architectures\": [\"DeepseekV3ForCausalLM\"], \"attention_bias\": false, \"attention_dropout\": 0.0,"
                " \"auto_map\": {\"AutoConfig\": \"configuration_deepseek.DeepseekV3Config\"}, \"aux_loss_alpha\": 0.001,"
                " \"bos_token_id\": 0, \"eos_token_id\": 1, \"ep_size\": 1, \"first_k_dense_replace\": 3, \"hidden_act\": \"silu\","
                " \"hidden_size\": 7168, \"initializer_range\": 0.02, \"intermediate_size\": 18432, \"kv_lora_rank\": 512,"
                " \"max_position_embeddings\": 163840, \"model_type\": \"deepseek_v3\", \"moe_intermediate_size\": 2048,"
                " \"moe_layer_freq\": 1, \"n_group\": 8, \"n_routed_experts\": 256, \"n_shared_experts\": 1, \"norm_topk_prob\": true,"
                " \"num_attention_heads\": 128, \"num_experts_per_tok\": 8, \"num_hidden_layers\": 61, \"num_key_value_heads\": 128,"
                " \"num_nextn_predict_layers\": 1, \"pretraining_tp\": 1, \"q_lora_rank\": 1536, \"qk_nope_head_dim\": 128,"
                " \"qk_rope_head_dim\": 64, \"quantization_config\": {\"activation_scheme\": \"dynamic\", \"fmt\": \"e4m3\","
                " \"quant_method\": \"fp8\", \"weight_block_size\": [128, 128]}, \"rms_norm_eps\": 1e-06, \"rope_scaling\":"
                " {\"beta_fast\": 32, \"beta_slow\": 1, \"factor\": 40, \"mscale\": 1.0, \"mscale_all_dim\": 1.0,"
                " \"original_max_position_embeddings\": 4096, \"type\": \"yarn\"}, \"rope_theta\": 10000, \"routed_scaling_factor\": 2.5,"
                " \"scoring_func\": \"sigmoid\", \"seq_aux\": true, \"tie_word_embeddings\": false, \"topk_group\": 4,"
                " \"topk_method\": \"noaux_tc\", \"torch_dtype\": \"bfloat16\", \"transformers_version\": \"4.33.1\","
                " \"use_cache\": true, \"v_head_dim\": 128, \"vocab_size\": 129280}";
            s = moe_config_parse(ctx, v3, sizeof v3 - 1, &c);
            T_CHECK(s == MOE_OK && c.rope_scaling.factor == 40 && c.rope_scaling.original_max_pos == 4096 && c.n_routed_experts == 256 &&
                        c.rope_layout == MOE_ROPE_PAIRS && c.num_nextn_predict_layers == 1,
                    "DeepSeek-V3's config.json: %s", moe_ctx_error(ctx));
        }
        cfg_json(buf, sizeof buf, "hidden_size", NULL); /* a key spelled with an escape is the same key */
        strcpy(buf + strlen(buf) - 1, ", \"hidden\\u005fsize\": 24}");
        s = moe_config_parse(ctx, buf, strlen(buf), &c);
        T_CHECK(s == MOE_OK && c.hidden_size == 24, "escaped key: %s", moe_ctx_error(ctx));
    }
    moe_ctx_free(ctx);
}
#endif

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
static void st_roundtrip_accepted(void) { run_isolated(run_st_roundtrip_accepted); }
#if BI_POSIX
static void hf_roundtrip_accepted(void) { run_isolated(run_hf_roundtrip_accepted); }
static void hf_fused_accepted(void) { run_isolated(run_hf_fused_accepted); }
#endif

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
    T_RUN_FILTERED(st_roundtrip_accepted);
#if BI_POSIX
    T_RUN_FILTERED(hf_roundtrip_accepted);
    T_RUN_FILTERED(hf_fused_accepted);
#endif
    return t_summary();
}
