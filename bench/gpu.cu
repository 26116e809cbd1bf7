/* bench/gpu.cu — the CUDA backend on one GPU: GEMM TFLOP/s and a training step's MFU.

   1. GEMMs through the kernel table (what the layers call: operands in FP32 memory), as
      Fprop products Y[m,n] = X[m,k]·W[n,k]ᵀ: FP32 (no TF32), BF16 (operands rounded into
      BF16 step memory, FP32 sums), FP8 E4M3 by the V3 recipe with 128-wide tiles and blocks
      (quantised and dequantised, then the BF16 GEMM: the recipe's arithmetic, not yet the
      FP8 tensor cores); and cuBLASLt's BF16 kernel alone on operands already in BF16 (what
      the packing costs is the difference). Shapes: 8192³ and the expert shapes of the
      training config below and of DeepSeek-V3 (tokens × hidden → 2·width, and back).
      Each: 3 warm-up calls, then cudaEvent time over calls summing to ≥ 0.5 s; TFLOP/s =
      2mnk / time.
   2. A training step (forward, backward, AdamW, expert-bias update; moe_model_loss with MTP)
      of a config sized for one 80 GB GPU, stated below and in the JSON: tokens/s and MFU =
      model FLOP/s (bench/bench_flops.h, gpu.md §7.4) over the dense BF16 peak of H100/H200
      SXM, 989.4 TFLOP/s (for FP32 and FP8 steps too, so the rows compare). Two warm-up steps,
      then the median of steps summing to ≥ 5 s.
   Built by nvcc only: ./build.sh cuda (build/cuda/bench_gpu); tests/gpu/run.sh runs it.
     bench_gpu [--quick]    --quick: 8192³ and one training row (fewer steps)
   0. First, on Hopper: the FP8 GEMMs of a linear layer (Fprop, Dgrad, Wgrad) on the tensor
      cores against the emulation, on shapes with partial blocks and blocks scaled by 2^-4..2^4
      (fp8_tc_vs_emulation): the check that the layouts and scale indices are right.
   Last line: {"bench":"gpu","device":…,"bf16_peak_tflops":…,"fp8_tc_vs_emulation":…,"gemm":[{"m","n","k","kind","tflops"},…],
   "train":{"config":{…},"rows":[{"precision","ms_per_step","tokens_per_s","mfu","loss"},…]}} */
#define MOE_IMPLEMENTATION
#include "moe.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#include "bench_flops.h"

#define BF16_PEAK_TFLOPS 989.4 /* H100 / H200 SXM, dense (the 1979 of the spec sheet is with sparsity) */

static int quick;

#define CHECK(ctx, call)                                                                            \
    do {                                                                                            \
        moe_status s_ = (call);                                                                     \
        if (s_ != MOE_OK) {                                                                         \
            fprintf(stderr, "bench_gpu: %s: %s (%s:%d)\n", moe_status_name(s_), moe_ctx_error(ctx), __FILE__, __LINE__); \
            exit(1);                                                                                \
        }                                                                                           \
    } while (0)

/* ---- GEMMs ---- */

typedef enum { K_F32, K_BF16, K_FP8, K_BF16_KERNEL } gemm_kind;
static const char *const kind_names[] = {"fp32", "bf16", "fp8", "bf16_kernel_only"};

/* One product of `kind`, timed: TFLOP/s. */
static double gemm_tflops(moe_ctx *ctx, int64_t m, int64_t n, int64_t k, gemm_kind kind) {
    moe_tensor *X, *W, *Y;
    int64_t sx[2] = {m, k}, sw[2] = {n, k}, sy[2] = {m, n};
    moe_rng rng = moe_rng_new(5, 5);
    moe__gemm_op op;
    uint16_t *x16 = NULL, *w16 = NULL;
    cudaEvent_t e0, e1;
    float ms = 0;
    double total = 0;
    int reps = 0, i;
    CHECK(ctx, moe_tensor_new(ctx, MOE_F32, 2, sx, &X));
    CHECK(ctx, moe_tensor_new(ctx, MOE_F32, 2, sw, &W));
    CHECK(ctx, moe_tensor_new(ctx, MOE_F32, 2, sy, &Y));
    CHECK(ctx, moe_tensor_fill_normal(ctx, X, &rng, 0.0f, 1.0f));
    CHECK(ctx, moe_tensor_fill_normal(ctx, W, &rng, 0.0f, 0.02f));
    op = moe__gemm_1(m, n, k, (const moe_real *)X->data, k, 0, (const moe_real *)W->data, k, 1, (moe_real *)Y->data, n, 0,
                     kind == K_F32 ? MOE_F32 : kind == K_FP8 ? MOE_FP8_E4M3 : MOE_BF16);
    op.role_a = MOE_FP8_FPROP_X;
    op.role_b = MOE_FP8_FPROP_W;
    if (kind == K_BF16_KERNEL) { /* the operands in BF16 once, outside the timing */
        CHECK(ctx, moe__cuda_scratch(ctx, (size_t)(m * k) * 2, (void **)&x16));
        CHECK(ctx, moe__cuda_scratch(ctx, (size_t)(n * k) * 2, (void **)&w16));
        CHECK(ctx, moe__cuda_convert(ctx, X->data, MOE_F32, m * k, x16, MOE_BF16));
        CHECK(ctx, moe__cuda_convert(ctx, W->data, MOE_F32, n * k, w16, MOE_BF16));
    }
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    for (i = 0; i < 3 || total < (quick ? 0.2 : 0.5); i++) {
        int timed = i >= 3;
        if (timed) cudaEventRecord(e0, ctx->gpu->stream);
        if (kind == K_BF16_KERNEL) CHECK(ctx, moe__cuda_product(ctx, &op, CUDA_R_16BF, x16, k, 0, w16, k, 0, op.c, m, k));
        else CHECK(ctx, MOE__BE(ctx)->gemm(ctx, &op));
        if (timed) {
            cudaEventRecord(e1, ctx->gpu->stream);
            cudaEventSynchronize(e1);
            cudaEventElapsedTime(&ms, e0, e1);
            total += ms / 1e3;
            reps++;
        }
        if (kind != K_BF16_KERNEL) moe_ctx_reset(ctx); /* the packed operands' step memory, reused */
    }
    CHECK(ctx, moe_cuda_sync(ctx));
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    moe_ctx_reset(ctx);
    moe_tensor_free(ctx, X);
    moe_tensor_free(ctx, W);
    moe_tensor_free(ctx, Y);
    return 2.0 * (double)m * (double)n * (double)k * reps / total / 1e12;
}

/* ---- FP8 on the tensor cores against the recipe's emulation ---- */

/* Each 128×128 block of t multiplied by 2^u, u uniform in [-4, 4]: scales that differ from
   tile to tile and block to block, so a misplaced scale changes the result. */
static void vary_blocks(moe_ctx *ctx, moe_tensor *t, moe_rng *rng) {
    int64_t R = t->shape[0], C = t->shape[1], i, j;
    float *h = (float *)malloc((size_t)(R * C) * sizeof(float));
    int64_t nbr = (R + 127) / 128, nbc = (C + 127) / 128;
    float *mult = (float *)malloc((size_t)(nbr * nbc) * sizeof(float));
    CHECK(ctx, moe_tensor_download(ctx, t, h, (size_t)(R * C) * sizeof(float)));
    for (i = 0; i < nbr * nbc; i++) mult[i] = ldexpf(1.0f, (int)(moe_rng_next(rng) % 9) - 4);
    for (i = 0; i < R; i++)
        for (j = 0; j < C; j++) h[i * C + j] *= mult[(i / 128) * nbc + j / 128];
    CHECK(ctx, moe_tensor_upload(ctx, t, h, (size_t)(R * C) * sizeof(float)));
    free(h);
    free(mult);
}

/* One GEMM of a linear layer in FP8 (g: 0 Fprop Y = X·Wᵀ, 1 Dgrad dX = dY·W, 2 Wgrad dW = dYᵀ·X,
   each operand in its role) of an M-token layer with W [N, K], on the tensor cores and in the
   emulation (the same codes and scales, exact products, FP32 sums): ‖tc − emu‖ / ‖emu‖, or −1
   when the tensor cores did not take it. They differ only in how the sums accumulate, so a
   wrong layout or scale index shows as O(1). */
static double fp8_tc_vs_emulation(moe_ctx *ctx, int g, int64_t M, int64_t N, int64_t K) {
    moe_tensor *X, *W, *dY, *C1, *C2;
    int64_t sx[2] = {M, K}, sw[2] = {N, K}, sd[2] = {M, N}, sc[1] = {(M > N ? M : N) * (K > N ? K : N)};
    moe_rng rng = moe_rng_new(9, (uint64_t)g);
    int64_t i, n = g == 0 ? M * N : g == 1 ? M * K : N * K, before = ctx->gpu->fp8_tc_products;
    float *h[2];
    double num = 0, den = 0;
    int tc;
    CHECK(ctx, moe_tensor_new(ctx, MOE_F32, 2, sx, &X));
    CHECK(ctx, moe_tensor_new(ctx, MOE_F32, 2, sw, &W));
    CHECK(ctx, moe_tensor_new(ctx, MOE_F32, 2, sd, &dY));
    CHECK(ctx, moe_tensor_new(ctx, MOE_F32, 1, sc, &C1));
    CHECK(ctx, moe_tensor_new(ctx, MOE_F32, 1, sc, &C2));
    CHECK(ctx, moe_tensor_fill_normal(ctx, X, &rng, 0.0f, 1.0f));
    CHECK(ctx, moe_tensor_fill_normal(ctx, W, &rng, 0.0f, 0.02f));
    CHECK(ctx, moe_tensor_fill_normal(ctx, dY, &rng, 0.0f, 1e-3f));
    vary_blocks(ctx, X, &rng);
    vary_blocks(ctx, W, &rng);
    vary_blocks(ctx, dY, &rng);
    for (tc = 0; tc < 2; tc++) {
        const moe_real *x = (const moe_real *)X->data, *w = (const moe_real *)W->data, *dy = (const moe_real *)dY->data;
        moe_real *c = (moe_real *)(tc ? C1 : C2)->data;
        moe__gemm_op op = g == 0 ? moe__gemm_1(M, N, K, x, K, 0, w, K, 1, c, N, 0, MOE_FP8_E4M3)     /* Fprop */
                        : g == 1 ? moe__gemm_1(M, K, N, dy, N, 0, w, K, 0, c, K, 0, MOE_FP8_E4M3)   /* Dgrad */
                                 : moe__gemm_1(N, K, M, dy, N, 1, x, K, 0, c, K, 0, MOE_FP8_E4M3);  /* Wgrad */
        op.role_a = g == 0 ? MOE_FP8_FPROP_X : g == 1 ? MOE_FP8_DGRAD_DY : MOE_FP8_WGRAD_DY;
        op.role_b = g == 0 ? MOE_FP8_FPROP_W : g == 1 ? MOE_FP8_DGRAD_W : MOE_FP8_WGRAD_X;
        ctx->gpu->fp8_tensor_cores = tc;
        CHECK(ctx, MOE__BE(ctx)->gemm(ctx, &op));
        h[tc] = (float *)malloc((size_t)n * sizeof(float));
        CHECK(ctx, moe__cuda_download(ctx, h[tc], c, (size_t)n * sizeof(float)));
        moe_ctx_reset(ctx);
    }
    ctx->gpu->fp8_tensor_cores = 1;
    for (i = 0; i < n; i++) {
        num += ((double)h[1][i] - h[0][i]) * ((double)h[1][i] - h[0][i]);
        den += (double)h[0][i] * h[0][i];
    }
    free(h[0]);
    free(h[1]);
    moe_tensor_free(ctx, X);
    moe_tensor_free(ctx, W);
    moe_tensor_free(ctx, dY);
    moe_tensor_free(ctx, C1);
    moe_tensor_free(ctx, C2);
    return ctx->gpu->fp8_tc_products == before + 1 ? sqrt(num / den) : -1;
}
#define FP8_TC_TOL 1e-2 /* both sides multiply the same E4M3 codes: only the accumulation differs */

/* ---- the training step ---- */

/* A DeepSeek-V3-shaped model for one 80 GB GPU: 0.9B parameters (64 routed experts of width
   512, 6 of them + 1 shared per token), 8 layers (the first dense), MLA with 16 heads, one MTP
   module; 8 × 1024 tokens a step. FP32 parameters, gradients and AdamW moments ≈ 16 bytes a
   parameter (14 GiB) plus the step's activations. */
static moe_config gpu_config(void) {
    moe_config c = moe_config_small();
    c.vocab_size = 32768; c.hidden_size = 1024; c.intermediate_size = 2816; c.moe_intermediate_size = 512;
    c.num_hidden_layers = 8; c.first_k_dense_replace = 1; c.num_attention_heads = 16;
    c.q_lora_rank = 384; c.kv_lora_rank = 256; c.qk_nope_head_dim = 64; c.qk_rope_head_dim = 32; c.v_head_dim = 64;
    c.n_routed_experts = 64; c.num_experts_per_tok = 6; c.n_group = 8; c.topk_group = 4; c.n_shared_experts = 1;
    c.max_position_embeddings = 1024; c.num_nextn_predict_layers = 1;
    return c;
}
#define TRAIN_B 8
#define TRAIN_T 1024

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Steps of the config in `precision`: the median ms per step; *loss the last step's. */
static double train_ms(moe_ctx *ctx, moe_dtype precision, double *loss) {
    moe_config c = gpu_config();
    moe_model *m = NULL;
    moe_adamw *o = NULL;
    moe_adamw_config ac;
    moe_loss_opts lo;
    moe_loss_parts parts;
    moe_tensor *l;
    moe_rng rng = moe_rng_new(7, 7);
    int32_t *toks = (int32_t *)malloc(sizeof(int32_t) * TRAIN_B * (TRAIN_T + 1));
    double times[256], total = 0;
    int n = 0, i;
    memset(&ac, 0, sizeof ac);
    ac.beta1 = 0.9f; ac.beta2 = 0.95f; ac.eps = 1e-8f; ac.weight_decay = 0.1f; ac.moment_dtype = MOE_F32;
    memset(&lo, 0, sizeof lo);
    lo.mtp_lambda = 0.3f;
    lo.balance_alpha = 1e-4f;
    for (i = 0; i < TRAIN_B * (TRAIN_T + 1); i++) toks[i] = (int32_t)(moe_rng_next(&rng) % (uint64_t)c.vocab_size);
    CHECK(ctx, moe_ctx_set_gemm_precision(ctx, precision));
    CHECK(ctx, moe_model_new(ctx, &c, 1, &m));
    CHECK(ctx, moe_adamw_new(ctx, m, &ac, &o));
    for (i = 0; i < 256 && (i < 2 || n < 3 || total < (quick ? 2.0 : 5.0)); i++) {
        double t0;
        CHECK(ctx, moe_cuda_sync(ctx));
        t0 = moe_time_s();
        CHECK(ctx, moe_model_loss(ctx, m, toks, TRAIN_B, TRAIN_T, &lo, &l, &parts));
        CHECK(ctx, moe_backward(ctx, l));
        moe_ctx_reset(ctx);
        CHECK(ctx, moe_adamw_step(ctx, o, 1e-4f, 1.0f, 1.0f, NULL));
        CHECK(ctx, moe_model_update_expert_bias(ctx, m, 1e-3f));
        moe_ctx_reset(ctx);
        CHECK(ctx, moe_cuda_sync(ctx));
        if (i >= 2) {
            times[n] = moe_time_s() - t0;
            total += times[n++];
        }
        *loss = parts.total;
    }
    qsort(times, (size_t)n, sizeof times[0], cmp_double);
    moe_adamw_free(ctx, o);
    moe_model_free(ctx, m);
    free(toks);
    return 1e3 * times[n / 2];
}

int main(int argc, char **argv) {
    static const int64_t shapes[][3] = {
        {8192, 8192, 8192},
        {8192, 1024, 1024}, {8192, 1024, 512}, /* this config's experts: up (gate + up), down, 8192 rows */
        {4096, 4096, 7168}, {4096, 7168, 2048}, /* DeepSeek-V3's: 7168 → 2·2048, 2048 → 7168 */
    };
    static const moe_dtype precisions[] = {MOE_BF16, MOE_FP8_E4M3, MOE_F32};
    moe_ctx *ctx = NULL;
    moe_fp8_options f8;
    moe_config c = gpu_config();
    char json[8192];
    size_t used = 0;
    int s, k, n_shapes = (int)(sizeof shapes / sizeof shapes[0]), n_prec = 3;
    double flops = step_flops(&c, TRAIN_B, TRAIN_T, 1), fp8_err = -1;
    for (s = 1; s < argc; s++) {
        if (strcmp(argv[s], "--quick") == 0) quick = 1;
        else { fprintf(stderr, "usage: bench_gpu [--quick]\n"); return 2; }
    }
    if (quick) n_shapes = 1, n_prec = 1;
    if (moe_ctx_new(&ctx) != MOE_OK) return 1;
    CHECK(ctx, moe_ctx_set_device(ctx, MOE_DEVICE_CUDA, 0));
    memset(&f8, 0, sizeof f8);
    f8.block = 128;
    CHECK(ctx, moe_ctx_set_fp8(ctx, &f8));
    if (ctx->gpu->fp8_tensor_cores) {
        /* shapes with a partial last block in every dimension the tensor cores take (k must be
           a multiple of 128: Fprop K = 640, Dgrad N = 896, Wgrad M = 1152) and padded K-block
           counts (5, 7, 9 → 8, 8, 12) */
        static const int64_t dims[3][3] = {{1152, 904, 640}, {1032, 896, 648}, {1152, 904, 640}};
        static const char *const names[3] = {"Fprop", "Dgrad", "Wgrad"};
        int g;
        for (g = 0; g < 3; g++) {
            double e = fp8_tc_vs_emulation(ctx, g, dims[g][0], dims[g][1], dims[g][2]);
            int ok = e >= 0 && e <= FP8_TC_TOL;
            printf("FP8 %s on the tensor cores vs the recipe's emulation (M %lld, N %lld, K %lld): %s %.2e (tolerance %.0e): %s\n",
                   names[g], (long long)dims[g][0], (long long)dims[g][1], (long long)dims[g][2], e >= 0 ? "difference" : "not taken",
                   e, FP8_TC_TOL, ok ? "ok" : "FAIL");
            fp8_err = !ok ? (e >= 0 ? e : 1e9) : e > fp8_err ? e : fp8_err;
        }
    } else {
        printf("FP8 tensor cores: not used on this GPU (compute capability 9.x only) or turned off (MOE_CUDA_FP8_TC=0)\n");
    }
    printf("device: %s; BF16 dense peak %.1f TFLOP/s\n\n%-22s %-18s %10s\n", moe_cuda_device_name(ctx), BF16_PEAK_TFLOPS, "gemm m n k",
           "kind", "TFLOP/s");
    used += (size_t)snprintf(json + used, sizeof json - used,
                             "{\"bench\":\"gpu\",\"device\":\"%s\",\"bf16_peak_tflops\":%.1f,\"fp8_tc_vs_emulation\":%.3g,\"gemm\":[",
                             moe_cuda_device_name(ctx), BF16_PEAK_TFLOPS, fp8_err);
    for (s = 0; s < n_shapes; s++)
        for (k = 0; k < 4; k++) {
            double tf = gemm_tflops(ctx, shapes[s][0], shapes[s][1], shapes[s][2], (gemm_kind)k);
            char dims[64];
            snprintf(dims, sizeof dims, "%lld %lld %lld", (long long)shapes[s][0], (long long)shapes[s][1], (long long)shapes[s][2]);
            printf("%-22s %-18s %10.1f\n", dims, kind_names[k], tf);
            used += (size_t)snprintf(json + used, sizeof json - used, "%s{\"m\":%lld,\"n\":%lld,\"k\":%lld,\"kind\":\"%s\",\"tflops\":%.1f}",
                                     s || k ? "," : "", (long long)shapes[s][0], (long long)shapes[s][1], (long long)shapes[s][2],
                                     kind_names[k], tf);
        }
    printf("\ntraining step: hidden %lld, %lld layers, %lld experts of width %lld, top-%lld + %lld shared, "
           "%d x %d tokens, %.3g model FLOP a step\n%-10s %12s %12s %8s %10s\n",
           (long long)c.hidden_size, (long long)c.num_hidden_layers, (long long)c.n_routed_experts,
           (long long)c.moe_intermediate_size, (long long)c.num_experts_per_tok, (long long)c.n_shared_experts, TRAIN_B, TRAIN_T, flops,
           "precision", "ms/step", "tokens/s", "MFU", "loss");
    used += (size_t)snprintf(json + used, sizeof json - used,
                             "],\"train\":{\"config\":{\"hidden\":%lld,\"layers\":%lld,\"experts\":%lld,\"expert_width\":%lld,\"top_k\":%lld,"
                             "\"batch\":%d,\"seq\":%d,\"flops_per_step\":%.6g},\"rows\":[",
                             (long long)c.hidden_size, (long long)c.num_hidden_layers, (long long)c.n_routed_experts,
                             (long long)c.moe_intermediate_size, (long long)c.num_experts_per_tok, TRAIN_B, TRAIN_T, flops);
    for (k = 0; k < n_prec; k++) {
        double loss = 0, ms = train_ms(ctx, precisions[k], &loss), tps = TRAIN_B * TRAIN_T / (ms / 1e3);
        double mfu = flops / (ms / 1e3) / (BF16_PEAK_TFLOPS * 1e12);
        printf("%-10s %12.1f %12.0f %7.1f%% %10.4f\n", moe_dtype_name(precisions[k]), ms, tps, 100 * mfu, loss);
        used += (size_t)snprintf(json + used, sizeof json - used,
                                 "%s{\"precision\":\"%s\",\"ms_per_step\":%.2f,\"tokens_per_s\":%.0f,\"mfu\":%.4f,\"loss\":%.5f}", k ? "," : "",
                                 moe_dtype_name(precisions[k]), ms, tps, mfu, loss);
    }
    snprintf(json + used, sizeof json - used, "]}}");
    printf("%s\n", json);
    moe_ctx_free(ctx);
    return 0;
}
