/* bench/fp8.c — the FP8 training recipe against BF16 on this CPU.

   (a) One model (a dense layer, then a MoE layer with V3's eight routed experts per token,
       of sixteen, plus a shared one; no MTP), seed and data order trained three times: BF16
       (the baseline), FP8 with 1×128 / 128×128 scaling (the DeepSeek-V3 recipe) and FP8 with
       one scale per tensor (the ablation). Width D = --hidden (default 256): hidden D, q/kv
       latents D, heads × v_head_dim D, expert width D, dense width 2D, 2048 tokens a step, so
       with D a multiple of 128 every GEMM reduction dim is one and the real B = 128 recipe
       applies. Batch 32 × 64 and peak lr 1e-3 keep the runs' trajectories close (with 8 × 64
       and 2e-3 two runs differing only in rounding ended up to 1.4% apart, measured).
       Relative loss error = |mean FP8 loss − mean BF16 loss| / mean BF16 loss over the last
       100 steps (the training losses of the same batches). A fourth run in FP32 shows what
       rounding alone does to this measure. The expert-bias update is off (γ = 0; --gamma
       sets it): it moves each bias by ±γ on the sign of an integer load difference, so a
       one-token change flips it, and with γ = 1e-3 the FP32 and BF16 runs ended 0.7% apart
       (measured), which would swamp what this bench measures. The balance loss stays on.
       Runs differing only in rounding still end a few tenths of a percent apart, so --seeds N
       repeats all four from N initialisations and data orders: the losses are then means over
       the seeds, and each precision's paired difference from BF16 gets a standard error.
       The first seed's FP8 run also adds up, over its last 100 steps, the quantisation error
       of every GEMM operand with both scalings on the same values (moe_fp8_stats): the
       direct measure of what fine-grained scaling buys, free of the trajectories' noise.
   (b) Bytes of the activations the layers save for backward (moe_ctx_saved_bytes after the
       forward pass of one step) in FP32, BF16 and FP8, and of weights + optimizer state.
   (c) Throughput of one linear layer's forward GEMM (2048 × 512 → 1536) in FP32, BF16 and
       FP8; the FP8 time includes quantising X (1×128 tiles) and W (128×128 blocks) into
       their dequantised values, as in training, then the BF16 GEMM (exact on them).

     fp8 [--steps N] [--hidden D] [--seeds N] [--seed S] [--threads N] [--out DIR] [--gamma G]
                              (defaults 1000, 256, 1, 1, all cores, out/bench_fp8, 0)
     fp8 --only bf16|fp8|fp8_tensor|fp32 [...]      one training run: DIR/loss_NAME.csv and its
                                                    mean loss over the last 100 steps (FP8: and
                                                    its operand statistics)
     fp8 --replot [--out DIR]                       draw DIR/loss.png again from DIR/loss.csv

   Writes DIR/loss.csv (step, the loss per precision averaged over the seeds, then each seed's)
   and, when gnuplot is installed, DIR/loss.png. Last line: {"bench":"fp8","rel_loss_err_fp8":…,
   "rel_loss_err_pertensor":…,"act_bytes_bf16":…,"act_bytes_fp8":…,"act_bytes_fp32":…,
   "rel_loss_err_fp32":…,…,"seeds":N,"diff_fp8":…,"diff_fp8_se":…,…} */
#define MOE_IMPLEMENTATION
#include "moe.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "bench_cpu.h"

#define CHECK(call)                                                                               \
    do {                                                                                          \
        moe_status s_ = (call);                                                                   \
        if (s_ != MOE_OK) {                                                                       \
            fprintf(stderr, "bench fp8: %s: %s\n", moe_status_name(s_), moe_ctx_error(ctx));      \
            exit(1);                                                                              \
        }                                                                                         \
    } while (0)

enum { BATCH = 32, SEQ = 64, RUNS = 4, TAIL = 100 };
static const char *const run_names[RUNS] = {"bf16", "fp8", "fp8_tensor", "fp32"};

static int64_t g_hidden = 256; /* --hidden */

static moe_config bench_config(void) {
    moe_config c = moe_config_tiny();
    int64_t D = g_hidden;
    c.vocab_size = 256; c.hidden_size = D; c.intermediate_size = 2 * D; c.moe_intermediate_size = D;
    c.num_hidden_layers = 2; c.first_k_dense_replace = 1; c.num_attention_heads = 4;
    c.q_lora_rank = D; c.kv_lora_rank = D; c.qk_nope_head_dim = D / 4; c.qk_rope_head_dim = 16; c.v_head_dim = D / 4;
    c.n_routed_experts = 16; c.n_shared_experts = 1; c.num_experts_per_tok = 8; c.n_group = 4; c.topk_group = 2;
    c.num_nextn_predict_layers = 0;
    c.max_position_embeddings = SEQ;
    return c;
}

static void set_precision(moe_ctx *ctx, int run, int stats) {
    moe_fp8_options o;
    memset(&o, 0, sizeof o);
    o.per_tensor = run == 2;
    o.stats = stats;
    CHECK(moe_ctx_set_fp8(ctx, &o));
    CHECK(moe_ctx_set_gemm_precision(ctx, run == 0 ? MOE_BF16 : run == 3 ? MOE_F32 : MOE_FP8_E4M3));
}

/* Train `steps` steps in precision `run` from initial weights and a data order drawn from
   `seed`; losses[step]; returns ms per step. With `stats` (an FP8 run of at least 2·TAIL
   steps) the last TAIL steps also add up every GEMM operand's quantisation error in both
   scalings; they are slower and left out of the timing. */
static double g_gamma = 0.0; /* expert-bias update speed (see the header) */

static double train(moe_ctx *ctx, const moe_dataset *data, int run, uint64_t seed, long steps, double *losses,
                    moe_fp8_stats *stats) {
    moe_config c = bench_config();
    moe_model *m = NULL;
    moe_adamw *opt = NULL;
    moe_lr_schedule sched;
    moe_loss_opts lo;
    int32_t *batch = (int32_t *)malloc(sizeof(int32_t) * BATCH * (SEQ + 1));
    double t0;
    long step, timed;
    if (!batch) exit(1);
    if (steps < 2 * TAIL) stats = NULL;
    timed = stats ? steps - TAIL : steps;
    set_precision(ctx, run, 0);
    CHECK(moe_model_new(ctx, &c, seed, &m));
    CHECK(moe_adamw_new(ctx, m, NULL, &opt));
    memset(&sched, 0, sizeof sched);
    sched.shape = MOE_LR_COSINE; sched.lr_max = 1e-3f; sched.lr_min = 1e-4f; sched.warmup_steps = 50; sched.total_steps = steps;
    lo.mtp_lambda = 0.3f;
    lo.balance_alpha = 1e-4f;
    t0 = moe_time_s();
    for (step = 0; step < steps; step++) {
        moe_tensor *loss;
        moe_loss_parts parts;
        if (step == timed) {
            t0 = moe_time_s() - t0;
            set_precision(ctx, run, 1);
        }
        CHECK(moe_data_batch(ctx, data, 0, seed, step, BATCH, SEQ, batch));
        CHECK(moe_model_loss(ctx, m, batch, BATCH, SEQ, &lo, &loss, &parts));
        CHECK(moe_backward(ctx, loss));
        moe_ctx_reset(ctx);
        CHECK(moe_adamw_step(ctx, opt, moe_lr_at(&sched, step), 1.0f, 1.0f, NULL));
        CHECK(moe_model_update_expert_bias(ctx, m, (float)g_gamma));
        losses[step] = parts.total;
        if (step % 100 == 99) fprintf(stderr, "  seed %llu %-10s step %5ld  loss %.4f\n", (unsigned long long)seed, run_names[run], step + 1, parts.total);
    }
    if (stats) CHECK(moe_ctx_fp8_stats(ctx, stats));
    else t0 = moe_time_s() - t0;
    moe_adamw_free(ctx, opt);
    moe_model_free(ctx, m);
    free(batch);
    return 1e3 * t0 / (double)timed;
}

/* The table of an FP8 run's operand statistics (its last TAIL steps). */
static void print_stats(const moe_fp8_stats *st, const char *run, long steps) {
    static const char *const roles[MOE_FP8_ROLES] = {"Fprop X", "Fprop W", "Dgrad dY", "Dgrad W", "Wgrad dY", "Wgrad X"};
    int r;
    if (steps < 2 * TAIL) {
        printf("\n(operand statistics: runs of at least %d steps only)\n", 2 * TAIL);
        return;
    }
    printf("\nquantisation error of the FP8 GEMM operands, last %d steps of the %s run, both scalings on the same\n"
           "values (relative: sqrt(sum err^2 / sum x^2); per row = per token of X, dY or output channel of W, rms):\n", TAIL, run);
    printf("%-9s %12s %21s %21s %21s\n", "operand", "values", "whole: tiles  tensor", "per row: tiles tensor",
           "zeroed: tiles tensor");
    for (r = 0; r < MOE_FP8_ROLES; r++) {
        double n = (double)st->values[r], rows = st->rows[r] > 0 ? (double)st->rows[r] : 1, ss = st->sum_sq[r] > 0 ? st->sum_sq[r] : 1;
        printf("%-9s %12lld %13.5f %7.5f %13.5f %7.5f %12.2e %8.2e\n", roles[r], (long long)st->values[r], sqrt(st->err_sq_tiles[r] / ss),
               sqrt(st->err_sq_tensor[r] / ss), sqrt(st->row_rel_sq_tiles[r] / rows), sqrt(st->row_rel_sq_tensor[r] / rows),
               n > 0 ? (double)st->zeroed_tiles[r] / n : 0.0, n > 0 ? (double)st->zeroed_tensor[r] / n : 0.0);
    }
}

/* Saved-activation bytes of one forward pass in precision `prec`. */
static size_t saved_bytes(moe_ctx *ctx, const moe_dataset *data, moe_dtype prec) {
    moe_config c = bench_config();
    moe_model *m = NULL;
    moe_tensor *loss;
    static int32_t batch[BATCH * (SEQ + 1)];
    size_t bytes;
    set_precision(ctx, 1, 0);
    CHECK(moe_ctx_set_gemm_precision(ctx, prec));
    CHECK(moe_model_new(ctx, &c, 1, &m));
    CHECK(moe_data_batch(ctx, data, 0, 1, 0, BATCH, SEQ, batch));
    moe_ctx_reset(ctx);
    CHECK(moe_model_loss(ctx, m, batch, BATCH, SEQ, NULL, &loss, NULL));
    bytes = moe_ctx_saved_bytes(ctx);
    moe_ctx_reset(ctx);
    moe_model_free(ctx, m);
    return bytes;
}

/* GFLOP/s of Y = X·Wᵀ (n × in → out) through the linear layer of precision prec. */
static double linear_gflops(moe_ctx *ctx, moe_dtype prec) {
    enum { N = 2048, IN = 512, OUT = 1536 };
    moe_real *X = (moe_real *)malloc(sizeof(moe_real) * N * IN), *W = (moe_real *)malloc(sizeof(moe_real) * OUT * IN);
    moe_real *Y = (moe_real *)malloc(sizeof(moe_real) * N * OUT);
    moe_rng r = moe_rng_new(3, 0);
    double best = 1e30;
    int i, rep;
    if (!X || !W || !Y) exit(1);
    for (i = 0; i < N * IN; i++) X[i] = moe_rng_normal(&r);
    for (i = 0; i < OUT * IN; i++) W[i] = 0.05f * moe_rng_normal(&r);
    set_precision(ctx, 1, 0);
    for (rep = 0; rep < 7; rep++) {
        double t = moe_time_s();
        moe_ctx_reset(ctx);
        CHECK(moe__linear(ctx, X, N, IN, W, OUT, Y, prec));
        t = moe_time_s() - t;
        if (rep > 0 && t < best) best = t;
    }
    free(X); free(W); free(Y);
    return 2.0 * N * IN * OUT / best / 1e9;
}

/* x with six decimals, or null when it is not a number (a standard error of one seed). */
static const char *json_number(char buf[32], double x) {
    if (x == x) snprintf(buf, 32, "%.6f", x);
    else snprintf(buf, 32, "null");
    return buf;
}

/* Mean over the seeds of (a − b)/b, and its standard error (NaN for one seed). */
static double paired_diff(const double *a, const double *b, int seeds, double *se) {
    double m = 0, sd = 0;
    int k;
    for (k = 0; k < seeds; k++) m += (a[k] - b[k]) / b[k] / seeds;
    for (k = 0; k < seeds; k++) sd += ((a[k] - b[k]) / b[k] - m) * ((a[k] - b[k]) / b[k] - m);
    *se = seeds > 1 ? sqrt(sd / (seeds - 1) / seeds) : NAN;
    return m;
}

static double tail_mean(const double *l, long steps) {
    double s = 0;
    long i;
    for (i = steps - TAIL; i < steps; i++) s += l[i];
    return s / TAIL;
}

/* out/loss.png from the loss curves in the CSV at `path`, when gnuplot is installed. */
static void plot(const char *out, const char *path) {
    if (system("command -v gnuplot >/dev/null 2>&1") == 0) {
        char cmd[4096];
        snprintf(cmd, sizeof cmd,
                 "gnuplot -e \"set terminal pngcairo size 900,760; set output '%s/loss.png'; set datafile separator ',';"
                 " set multiplot layout 2,1 title 'moe.h: BF16, FP8 (1x128 / 128x128 scales), FP8 per tensor, FP32 - means over"
                 " the seeds'; set grid; set key top right;"
                 " set ylabel 'training loss'; set logscale y; set xrange [0:*];"
                 " plot '%s' using 1:2 with lines lw 2 title 'BF16', '' using 1:3 with lines title 'FP8 1x128 tiles',"
                 " '' using 1:4 with lines dt 2 title 'FP8 per tensor', '' using 1:5 with lines dt 3 title 'FP32';"
                 " unset logscale y; set xlabel 'step'; set ylabel '(loss - BF16 loss) / BF16 loss, smoothed';"
                 " set yrange [-0.03:0.03]; plot '%s' using 1:((\\$3-\\$2)/\\$2) smooth sbezier title 'FP8 1x128 tiles',"
                 " '' using 1:((\\$4-\\$2)/\\$2) smooth sbezier dt 2 title 'FP8 per tensor',"
                 " '' using 1:((\\$5-\\$2)/\\$2) smooth sbezier dt 3 title 'FP32'; unset multiplot\"",
                 out, path, path);
        if (system(cmd) == 0) printf("loss plot:   %s/loss.png\n", out);
        else printf("loss plot:   gnuplot failed\n");
    } else {
        printf("loss plot:   gnuplot not installed (./build.sh bench fp8 installs it)\n");
    }
}

int main(int argc, char **argv) {
    moe_ctx *ctx = NULL;
    moe_dataset *data = NULL;
    moe_config c = bench_config();
    long steps = 1000, i;
    int threads = 0, run, replot = 0, seeds = 1, k;
    uint64_t seed0 = 1;
    const char *out = "out/bench_fp8", *only = NULL;
    char path[1024];
    double *loss[RUNS], *tail[RUNS], ms[RUNS], mean[RUNS], diff[RUNS], diff_se[RUNS], gf[3];
    double diff_tiles, diff_tiles_se;
    int tiles_lower = 0;
    char se[3][32], cpu_json[512];
    bench_cpu cpu;
    moe_fp8_stats stats;
    size_t act[3];
    int64_t total = 0, active = 0, mtp = 0;
    FILE *f;
    for (i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--steps") == 0 && i + 1 < argc) steps = atol(argv[++i]);
        else if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc) threads = atoi(argv[++i]);
        else if (strcmp(argv[i], "--out") == 0 && i + 1 < argc) out = argv[++i];
        else if (strcmp(argv[i], "--only") == 0 && i + 1 < argc) only = argv[++i];
        else if (strcmp(argv[i], "--gamma") == 0 && i + 1 < argc) g_gamma = atof(argv[++i]);
        else if (strcmp(argv[i], "--hidden") == 0 && i + 1 < argc) g_hidden = atol(argv[++i]);
        else if (strcmp(argv[i], "--seeds") == 0 && i + 1 < argc) seeds = atoi(argv[++i]);
        else if (strcmp(argv[i], "--seed") == 0 && i + 1 < argc) seed0 = (uint64_t)atol(argv[++i]);
        else if (strcmp(argv[i], "--replot") == 0) replot = 1;
        else {
            fprintf(stderr, "usage: fp8 [--steps N (>= %d)] [--hidden D] [--seeds N] [--seed S] [--threads N] [--out DIR] [--gamma G]\n"
                            "           [--only bf16|fp8|fp8_tensor|fp32] [--replot]\n", TAIL);
            return 2;
        }
    }
    if (steps < TAIL) { fprintf(stderr, "bench fp8: --steps must be at least %d\n", TAIL); return 2; }
    if (seeds < 1 || seeds > 64) { fprintf(stderr, "bench fp8: --seeds must be 1 to 64\n"); return 2; }
    if (g_hidden < 64 || g_hidden % 64) { fprintf(stderr, "bench fp8: --hidden must be a multiple of 64 (of 128 for the B = 128 recipe)\n"); return 2; }
    if (replot) { /* only draw DIR/loss.png again from DIR/loss.csv */
        snprintf(path, sizeof path, "%s/loss.csv", out);
        plot(out, path);
        return 0;
    }
    c = bench_config();
    if (moe_ctx_new(&ctx) != MOE_OK) return 1;
    if (threads > 0) CHECK(moe_ctx_set_threads(ctx, threads));
    CHECK(moe_data_load(ctx, "data/austen.txt", 0.1, &data));
    {
        moe_model *m = NULL;
        CHECK(moe_model_new(ctx, &c, 1, &m));
        moe_model_param_counts(m, &total, &active, &mtp);
        moe_model_free(ctx, m);
    }
    bench_cpu_read(&cpu);
    printf("CPU: %s (%s)\n", cpu.model, cpu.id);
    printf("config: hidden %lld, 2 layers (1 dense of width %lld + 1 MoE: 16 experts top-8 + 1 shared, width %lld), MLA latents %lld;\n"
           "        %lld parameters (+%lld MTP); %d x %d tokens a step; %ld steps per run; seeds %llu..%llu; %d threads\n",
           (long long)c.hidden_size, (long long)c.intermediate_size, (long long)c.moe_intermediate_size, (long long)c.q_lora_rank,
           (long long)total, (long long)mtp, BATCH, SEQ, steps, (unsigned long long)seed0,
           (unsigned long long)(seed0 + (uint64_t)seeds - 1), moe_ctx_threads(ctx));

    mkdir("out", 0755);
    mkdir(out, 0755);
    if (only) {
        for (run = 0; run < RUNS && strcmp(only, run_names[run]); run++) {}
        if (run == RUNS) { fprintf(stderr, "bench fp8: --only wants bf16, fp8, fp8_tensor or fp32\n"); return 2; }
        loss[0] = (double *)malloc(sizeof(double) * (size_t)steps);
        if (!loss[0]) return 1;
        ms[0] = train(ctx, data, run, seed0, steps, loss[0], run == 1 || run == 2 ? &stats : NULL);
        snprintf(path, sizeof path, "%s/loss_%s.csv", out, only);
        f = fopen(path, "w");
        if (!f) { fprintf(stderr, "bench fp8: cannot write %s\n", path); return 1; }
        fprintf(f, "step,loss_%s\n", only);
        for (i = 0; i < steps; i++) fprintf(f, "%ld,%.6f\n", i + 1, loss[0][i]);
        fclose(f);
        printf("%s: %.1f ms/step, mean loss over the last %d steps %.6f (%s)\n", only, ms[0], TAIL, tail_mean(loss[0], steps), path);
        if (run == 1 || run == 2) print_stats(&stats, only, steps);
        free(loss[0]);
        moe_data_free(ctx, data);
        moe_ctx_free(ctx);
        return 0;
    }

    /* (a) loss curves: every precision from each seed, seed by seed; loss[run][k·steps + step] */
    for (run = 0; run < RUNS; run++) {
        loss[run] = (double *)malloc(sizeof(double) * (size_t)(steps * seeds));
        tail[run] = (double *)malloc(sizeof(double) * (size_t)seeds);
        if (!loss[run] || !tail[run]) return 1;
        ms[run] = 0;
    }
    for (k = 0; k < seeds; k++) {
        printf("seed %llu, mean loss over the last %d steps:", (unsigned long long)(seed0 + (uint64_t)k), TAIL);
        for (run = 0; run < RUNS; run++) {
            ms[run] += train(ctx, data, run, seed0 + (uint64_t)k, steps, loss[run] + k * steps, k == 0 && run == 1 ? &stats : NULL) / seeds;
            tail[run][k] = tail_mean(loss[run] + k * steps, steps);
            printf("  %s %.5f", run_names[run], tail[run][k]);
        }
        printf("\n");
        fflush(stdout);
    }
    /* Over the seeds: each precision's mean loss and its paired relative difference from
       BF16 (each seed's runs share weights and batches), and fine-grained vs per-tensor. */
    for (run = 0; run < RUNS; run++) {
        mean[run] = 0;
        for (k = 0; k < seeds; k++) mean[run] += tail[run][k] / seeds;
        diff[run] = paired_diff(tail[run], tail[0], seeds, &diff_se[run]);
    }
    diff_tiles = paired_diff(tail[1], tail[2], seeds, &diff_tiles_se);
    for (k = 0; k < seeds; k++) tiles_lower += tail[1][k] < tail[2][k];

    /* (b) bytes */
    act[0] = saved_bytes(ctx, data, MOE_F32);
    act[1] = saved_bytes(ctx, data, MOE_BF16);
    act[2] = saved_bytes(ctx, data, MOE_FP8_E4M3);

    /* (c) GEMM throughput */
    gf[0] = linear_gflops(ctx, MOE_F32);
    gf[1] = linear_gflops(ctx, MOE_BF16);
    gf[2] = linear_gflops(ctx, MOE_FP8_E4M3);

    snprintf(path, sizeof path, "%s/loss.csv", out);
    f = fopen(path, "w");
    if (!f) { fprintf(stderr, "bench fp8: cannot write %s\n", path); return 1; }
    fprintf(f, "step,loss_bf16,loss_fp8,loss_fp8_tensor,loss_fp32"); /* means over the seeds, then each seed's */
    for (k = 0; seeds > 1 && k < seeds; k++)
        for (run = 0; run < RUNS; run++) fprintf(f, ",loss_%s_seed%llu", run_names[run], (unsigned long long)(seed0 + (uint64_t)k));
    fprintf(f, "\n");
    for (i = 0; i < steps; i++) {
        fprintf(f, "%ld", i + 1);
        for (run = 0; run < RUNS; run++) {
            double m = 0;
            for (k = 0; k < seeds; k++) m += loss[run][k * steps + i] / seeds;
            fprintf(f, ",%.6f", m);
        }
        for (k = 0; seeds > 1 && k < seeds; k++)
            for (run = 0; run < RUNS; run++) fprintf(f, ",%.6f", loss[run][k * steps + i]);
        fprintf(f, "\n");
    }
    fclose(f);
    printf("loss curves: %s\n", path);
    plot(out, path);

    printf("\n%-12s %10s %14s %14s %24s\n", "precision", "ms/step", "mean loss", "rel_loss_err", "paired (L - L_bf16)/L_bf16");
    printf("%-12s %10s %14s %14s %24s\n", "", "", "(last 100)", "vs bf16", "mean +- std. error");
    for (run = 0; run < RUNS; run++)
        printf("%-12s %10.1f %14.5f %14.5f %+13.5f +- %.5f\n", run_names[run], ms[run], mean[run], fabs(mean[run] - mean[0]) / mean[0],
               diff[run], diff_se[run]);
    printf("(means over %d seed%s)\n", seeds, seeds > 1 ? "s" : "; a standard error needs two or more");
    printf("fine-grained vs per-tensor FP8, paired (L_fp8 - L_fp8_tensor)/L_fp8_tensor: %+.5f +- %.5f; lower in %d of %d seeds\n",
           diff_tiles, diff_tiles_se, tiles_lower, seeds);
    print_stats(&stats, "first seed's fp8", steps);
    printf("\nactivations saved for backward (one step, %d tokens):\n", BATCH * SEQ);
    printf("  fp32 %zu B   bf16 %zu B   fp8 %zu B   (fp8/bf16 %.3f)\n", act[0], act[1], act[2], (double)act[2] / (double)act[1]);
    printf("weights + gradients + AdamW state, %lld parameters: FP32 master + FP32 grads + moments:\n", (long long)(total + mtp));
    printf("  FP32 moments %.2f MB, BF16 moments %.2f MB (the same in every GEMM precision; FP8 adds a transient\n"
           "  copy of each GEMM operand, its E4M3 values as floats, inside a step)\n",
           (double)(total + mtp) * 16 / 1e6, (double)(total + mtp) * 12 / 1e6);
    printf("linear layer forward 2048x512->1536, GFLOP/s: fp32 %.1f  bf16 %.1f  fp8 %.1f (quantise + the BF16 GEMM, exact on E4M3 values)\n",
           gf[0], gf[1], gf[2]);
    printf("{\"bench\":\"fp8\",%s,\"rel_loss_err_fp8\":%.6f,\"rel_loss_err_pertensor\":%.6f,\"act_bytes_bf16\":%zu,"
           "\"act_bytes_fp8\":%zu,\"act_bytes_fp32\":%zu,\"rel_loss_err_fp32\":%.6f,\"gflops_fp32\":%.1f,\"gflops_bf16\":%.1f,"
           "\"gflops_fp8\":%.1f,\"seeds\":%d,\"diff_fp8\":%.6f,\"diff_fp8_se\":%s,\"diff_pertensor\":%.6f,"
           "\"diff_pertensor_se\":%s,\"diff_fp8_vs_pertensor\":%.6f,\"diff_fp8_vs_pertensor_se\":%s}\n",
           bench_cpu_json(&cpu, cpu_json, sizeof cpu_json), fabs(mean[1] - mean[0]) / mean[0], fabs(mean[2] - mean[0]) / mean[0], act[1], act[2], act[0],
           fabs(mean[3] - mean[0]) / mean[0], gf[0], gf[1], gf[2], seeds, diff[1], json_number(se[0], diff_se[1]), diff[2],
           json_number(se[1], diff_se[2]), diff_tiles, json_number(se[2], diff_tiles_se));
    for (run = 0; run < RUNS; run++) {
        free(loss[run]);
        free(tail[run]);
    }
    moe_data_free(ctx, data);
    moe_ctx_free(ctx);
    return 0;
}
