/* bench/train_step.c — time of one training step (forward + backward + AdamW) and model FLOP
   utilisation.

   For each (config, precision, threads) row, a fresh child process builds the model, runs two
   warm-up steps and then times steps for about `--seconds` seconds; it reports the median
   ms/step, tokens/s, the peak resident memory of that process, and MFU = model FLOP/s over
   the FP32 FMA peak of the same thread count, which this program measures first with a
   register-resident FMA loop. Model FLOPs are the matmul FLOPs of the active path (every
   linear layer a token runs through: attention projections, router, shared and top-k routed
   experts, dense FFNs, MTP modules, output heads) plus causal attention (QKᵀ and PV), times 3
   for forward + backward.

     train_step                        the tiny and small configs, fp32 and bf16, 1 and 2 threads
     train_step --config F --batch B --seq T --precision P --threads N    one row

   Last line: {"bench":"train_step","fma_peak_gflops":{…},"rows":[{"config":…,"precision":…,
   "threads":…,"tokens_per_s":…,"mfu":…,"peak_rss_mb":…},…]} */
#define MOE_IMPLEMENTATION
#include "moe.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

/* ---- FMA peak: 12 independent accumulator chains per thread, no memory traffic ---- */
static double fma_peak_gflops(int threads) {
    const long iters = 40000000;
    double best = 0;
    int rep;
    /* best of 5: a rep whose second thread started late or shared a core reads low (seen once
       as a 2-thread "peak" equal to the 1-thread one) */
    for (rep = 0; rep < 5; rep++) {
        double t0 = moe_time_s(), sink = 0;
        int th;
        MOE__OMP(omp parallel for num_threads(threads) reduction(+:sink))
        for (th = 0; th < threads; th++) {
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

/* ---- model FLOPs per training step ---- */
static double linear_flops(int64_t in, int64_t out) { return 2.0 * (double)in * (double)out; }

static double block_flops(const moe_config *c, int is_moe, int64_t T) {
    int64_t d = c->hidden_size, H = c->num_attention_heads, dqk = c->qk_nope_head_dim + c->qk_rope_head_dim, I = c->moe_intermediate_size;
    double f = 0;
    if (c->q_lora_rank > 0) f += linear_flops(d, c->q_lora_rank) + linear_flops(c->q_lora_rank, H * dqk);
    else f += linear_flops(d, H * dqk);
    f += linear_flops(d, c->kv_lora_rank + c->qk_rope_head_dim) + linear_flops(c->kv_lora_rank, H * (c->qk_nope_head_dim + c->v_head_dim));
    f += linear_flops(H * c->v_head_dim, d);
    f += 2.0 * (double)H * (double)(dqk + c->v_head_dim) * (double)(T + 1) / 2.0; /* causal: (T+1)/2 keys on average */
    if (is_moe)
        f += linear_flops(d, c->n_routed_experts) + (double)(c->num_experts_per_tok + c->n_shared_experts) * 3.0 * linear_flops(d, I);
    else
        f += 3.0 * linear_flops(d, c->intermediate_size);
    return f;
}

/* Forward FLOPs per token of the main model and the MTP modules (each MTP depth k runs on
   T-k of the T tokens), times 3 for training. */
static double step_flops(const moe_config *c, int64_t B, int64_t T, int mtp) {
    double per_tok = 0, total;
    int64_t L, k;
    for (L = 0; L < c->num_hidden_layers; L++) per_tok += block_flops(c, L >= c->first_k_dense_replace, T);
    per_tok += linear_flops(c->hidden_size, c->vocab_size);
    total = per_tok * (double)(B * T);
    for (k = 1; mtp && k <= c->num_nextn_predict_layers; k++)
        total += (double)(B * (T - k)) * (block_flops(c, 1, T - k) + linear_flops(2 * c->hidden_size, c->hidden_size) +
                                          linear_flops(c->hidden_size, c->vocab_size));
    return 3.0 * total;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* One row, in this process: prints "ROW ms tokens_per_s flops peak_rss_mb". */
static int run_row(const char *config, const char *precision, int threads, int64_t B, int64_t T, double seconds) {
    moe_ctx *ctx = NULL;
    moe_config c;
    moe_model *m = NULL;
    moe_adamw *o = NULL;
    moe_loss_opts lo;
    int32_t *toks;
    double times[512], flops;
    int n = 0, i;
    struct rusage ru;
    moe_rng rng = moe_rng_new(7, 7);
    if (moe_ctx_new(&ctx)) return 1;
    if (strcmp(config, "tiny") == 0) c = moe_config_tiny();
    else if (strcmp(config, "small") == 0) c = moe_config_small();
    else if (moe_config_load(ctx, config, &c)) { fprintf(stderr, "%s\n", moe_ctx_error(ctx)); return 1; }
    if (moe_ctx_set_threads(ctx, threads) || moe_ctx_set_gemm_precision(ctx, strcmp(precision, "bf16") == 0 ? MOE_BF16 : MOE_F32) ||
        moe_model_new(ctx, &c, 1, &m) || moe_adamw_new(ctx, m, NULL, &o)) {
        fprintf(stderr, "setup: %s\n", moe_ctx_error(ctx));
        return 1;
    }
    toks = (int32_t *)malloc(sizeof(int32_t) * (size_t)(B * (T + 1)));
    for (i = 0; i < B * (T + 1); i++) toks[i] = (int32_t)(moe_rng_next(&rng) % (uint64_t)m->cfg.vocab_size);
    lo.mtp_lambda = 0.3f;
    lo.balance_alpha = 1e-4f;
    for (i = 0; i < 512; i++) {
        moe_tensor *loss;
        double t0 = moe_time_s(), total = 0;
        if (moe_model_loss(ctx, m, toks, B, T, &lo, &loss, NULL) || moe_backward(ctx, loss)) {
            fprintf(stderr, "step: %s\n", moe_ctx_error(ctx));
            return 1;
        }
        moe_ctx_reset(ctx);
        moe_adamw_step(ctx, o, 1e-4f, 1.0f, 1.0f, NULL);
        moe_model_update_expert_bias(ctx, m, 1e-3f);
        if (i >= 2) times[n++] = moe_time_s() - t0; /* two warm-up steps */
        {
            int j;
            for (j = 0; j < n; j++) total += times[j];
        }
        if (n >= 3 && total > seconds) break;
    }
    qsort(times, (size_t)n, sizeof times[0], cmp_double);
    flops = step_flops(&m->cfg, B, T, 1);
    getrusage(RUSAGE_SELF, &ru);
    printf("ROW %.3f %.1f %.6e %.1f\n", 1e3 * times[n / 2], (double)(B * T) / times[n / 2], flops, (double)ru.ru_maxrss / 1024.0);
    free(toks);
    moe_adamw_free(ctx, o);
    moe_model_free(ctx, m);
    moe_ctx_free(ctx);
    return 0;
}

int main(int argc, char **argv) {
    const char *config = NULL, *precision = NULL;
    int threads = 0, i, quick = 0;
    int64_t B = 0, T = 0;
    double seconds = 4.0, peak[3] = {0, 0, 0};
    char json[8192];
    size_t used;
    for (i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--row") == 0 && i + 6 < argc) { /* internal: one row in this process */
            return run_row(argv[i + 1], argv[i + 2], atoi(argv[i + 3]), atoll(argv[i + 4]), atoll(argv[i + 5]), atof(argv[i + 6]));
        } else if (strcmp(argv[i], "--config") == 0 && i + 1 < argc) config = argv[++i];
        else if (strcmp(argv[i], "--precision") == 0 && i + 1 < argc) precision = argv[++i];
        else if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc) threads = atoi(argv[++i]);
        else if (strcmp(argv[i], "--batch") == 0 && i + 1 < argc) B = atoll(argv[++i]);
        else if (strcmp(argv[i], "--seq") == 0 && i + 1 < argc) T = atoll(argv[++i]);
        else if (strcmp(argv[i], "--seconds") == 0 && i + 1 < argc) seconds = atof(argv[++i]);
        else if (strcmp(argv[i], "--quick") == 0) quick = 1;
        else {
            fprintf(stderr, "usage: train_step [--config tiny|small|FILE] [--batch B] [--seq T] [--precision fp32|bf16] [--threads N] [--seconds S] [--quick]\n");
            return 2;
        }
    }
    if (quick) seconds = 1.5;
    peak[1] = fma_peak_gflops(1);
    peak[2] = fma_peak_gflops(2);
    printf("FP32 FMA peak (measured): %.1f GFLOP/s on 1 thread, %.1f on 2\n\n", peak[1], peak[2]);
    printf("%-8s %-5s %3s %6s %10s %10s %9s %7s %8s\n", "config", "prec", "thr", "B x T", "ms/step", "tok/s", "GFLOP/s", "MFU", "RSS MB");
    used = (size_t)snprintf(json, sizeof json, "{\"bench\":\"train_step\",\"fma_peak_gflops\":{\"1\":%.1f,\"2\":%.1f},\"rows\":[", peak[1], peak[2]);
    {
        /* the rows: every combination of the given values, or of the defaults */
        const char *cfgs[2] = {"tiny", "small"}, *precs[2] = {"fp32", "bf16"};
        int ths[2] = {1, 2}, nc = 2, np = 2, nt = 2, ci, pi, ti;
        if (config) { cfgs[0] = config; nc = 1; }
        if (precision) { precs[0] = precision; np = 1; }
        if (threads) { ths[0] = threads; nt = 1; }
        for (ci = 0; ci < nc; ci++)
            for (pi = 0; pi < np; pi++)
                for (ti = 0; ti < nt; ti++) {
                    const char *cfg = cfgs[ci], *prec = precs[pi];
                    int th = ths[ti];
                    int64_t b = B ? B : 8, t = T ? T : strcmp(cfg, "tiny") == 0 ? 32 : 128;
                    char cmd[1024], line[256], bt[32];
                    double ms, tps, fl, rss, gf, mfu;
                    FILE *p;
                    snprintf(cmd, sizeof cmd, "'%s' --row '%s' %s %d %lld %lld %g", argv[0], cfg, prec, th, (long long)b, (long long)t, seconds);
                    p = popen(cmd, "r");
                    if (!p || !fgets(line, sizeof line, p) || sscanf(line, "ROW %lf %lf %lf %lf", &ms, &tps, &fl, &rss) != 4) {
                        fprintf(stderr, "row %s %s %d failed\n", cfg, prec, th);
                        if (p) pclose(p);
                        return 1;
                    }
                    pclose(p);
                    gf = fl / (ms / 1e3) / 1e9;
                    mfu = gf / peak[th >= 2 ? 2 : 1];
                    snprintf(bt, sizeof bt, "%lldx%lld", (long long)b, (long long)t);
                    printf("%-8s %-5s %3d %6s %10.1f %10.0f %9.1f %7.3f %8.1f\n", cfg, prec, th, bt, ms, tps, gf, mfu, rss);
                    used += (size_t)snprintf(json + used, sizeof json - used,
                                             "%s{\"config\":\"%s\",\"precision\":\"%s\",\"threads\":%d,\"batch\":%lld,\"seq\":%lld,"
                                             "\"ms_per_step\":%.2f,\"tokens_per_s\":%.1f,\"gflops\":%.2f,\"mfu\":%.4f,\"peak_rss_mb\":%.1f}",
                                             json[used - 1] == '}' ? "," : "", cfg, prec, th, (long long)b, (long long)t, ms, tps, gf, mfu, rss);
                    fflush(stdout);
                }
    }
    {
        moe_ctx *ctx = NULL;
        moe_model *m = NULL;
        moe_config c = moe_config_small();
        int64_t total, active, mtp;
        if (!moe_ctx_new(&ctx) && !moe_model_new(ctx, &c, 1, &m)) {
            moe_model_param_counts(m, &total, &active, &mtp);
            printf("\nsmall config: %lld parameters, %lld active per token, %lld in MTP\n", (long long)total, (long long)active, (long long)mtp);
            moe_model_free(ctx, m);
        }
        moe_ctx_free(ctx);
    }
    printf("%s]}\n", json);
    return 0;
}
