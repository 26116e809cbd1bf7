/* bench/train_step.c — time of one training step (forward + backward + AdamW) and model FLOP
   utilisation, against a PyTorch twin of the same model timed in the same run.

   For each (config, precision, threads) row and round, a fresh child process builds the model,
   runs two warm-up steps and then times steps for about `--seconds`/R seconds (R rounds, see
   below); it reports the median ms/step, tokens/s, the peak resident memory of that process, and MFU = model FLOP/s over
   the FP32 FMA peak of the same thread count, which this program measures first with
   register-resident FMA loops of both widths (256-bit, and 512-bit where the build has
   AVX-512F) and takes the faster: Intel's cores with two 512-bit FMA ports double their peak
   with 512-bit FMAs, Zen 4 runs them as two halves (both printed, both in the JSON). BF16
   rows' MFU is over the peak of the BF16 kernel moe.h runs here (MOE_GEMM_BF16: AMX tiles,
   vdpbf16ps, or FP32 FMAs), measured the same way. Model FLOPs are the matmul FLOPs of the active path (every
   linear layer a token runs through: attention projections, router, shared and top-k routed
   experts, dense FFNs, MTP modules, output heads) plus causal attention (QKᵀ and PV), times 3
   for forward + backward.

   The PyTorch twin (bench/train_step_torch.py, run by the parity venv's python: torch 2.x from
   PyPI with its own MKL/oneDNN kernels; eager, and compiled by torch.compile, the faster of
   its variants counting) is the same model, written in PyTorch: MLA with q/kv
   LoRA and decoupled RoPE, DeepSeekMoE (sigmoid routing + bias, group-limited top-k, shared
   expert, routed experts as one grouped GEMM over index-sorted rows), the MTP module and its
   loss weight, the sequence-wise balance loss, AdamW with the same betas, eps, weight decay and
   clipping, and the expert-bias update. Per config, moe.h writes its initial weights
   (moe_model_save_hf) and the tokens into a temporary directory; the twin loads them, and its
   first three FP32 step losses (each after the previous AdamW update) must match moe.h's
   within TWIN_LOSS_TOL (relative), which the table reports. Right after each moe.h row the
   twin is timed on the same weights, tokens, precision (BF16: torch.autocast, router and
   attention in FP32 as moe.h does) and torch.set_num_threads(threads), two warm-up steps
   excluded, median of the steps of about `--seconds`/R seconds. A row is R rounds (--rounds,
   default 2) of (moe.h, twin), and each side's best round counts: on a shared machine the
   least disturbed round is the closest to the code's speed, and alternating exposes both to the
   same load; each round's ms/step is in the JSON. ratio_vs_pytorch = moe.h tokens/s over
   PyTorch tokens/s. Without the venv (or with --no-torch) those fields are null.
   The python is $MOE_BENCH_PYTHON, or what tests/parity/setup_venv.sh prints (it makes the
   venv once: ~2 min); the script is looked up relative to the working directory (the
   repository root, as ./build.sh bench runs it).

     train_step                        the tiny and small configs, fp32 and bf16, 1 and 2 threads
     train_step --config F --batch B --seq T --precision P --threads N    one row
     train_step --no-torch             without the PyTorch twin
     train_step --rounds R             rounds per row (default 2)

   Last line: {"bench":"train_step","cpu":…,"cpu_id":…,"fma_peak_gflops":{…},"fma_peak_gflops_256":{…},
   "fma_peak_gflops_512":{…},"bf16_kernel":…,"bf16_peak_gflops":{…},"pytorch":{…}|null,
   "rows":[{"config":…,"precision":…,"threads":…,"tokens_per_s":…,"mfu":…,"peak_rss_mb":…,
   "pytorch_tokens_per_s":…,"ratio_vs_pytorch":…},…]} */
#define MOE_IMPLEMENTATION
#include "moe.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "bench_cpu.h"
#include "bench_flops.h"

/* ---- the training step (the twin reads these hyper-parameters from run.txt) ---- */
#define STEP_LR 1e-4f
#define STEP_CLIP 1.0f
#define STEP_MTP_LAMBDA 0.3f
#define STEP_BALANCE_ALPHA 1e-4f
#define STEP_BIAS_GAMMA 1e-3f
/* The twin's FP32 losses against moe.h's, relative: the timed model's first CHECK_STEPS steps
   (each after an AdamW update) and the unit-scale model's first step; measured 1e-7 to 5e-6
   apart (summation orders differ). Its gradients: per tensor, max|g_torch − g_moe| / max|g_moe|
   (tests/parity's measure and tolerance), measured ~2e-6. Mutations of the twin, measured on
   the unit-scale first-step loss: RoPE on halves instead of pairs, no RoPE, attention scale
   ×1.2, not causal, no group limit, no top-k renormalisation, routed scale 1, RMSNorm eps 1e-2,
   no balance loss move it by 2.3e-3 to 1 (tiny) and 3.9e-4 to 1 (small); masking dropped
   groups with 0 instead of −inf by 4.9e-2 on tiny (small's routing never reaches the mask). */
#define CHECK_STEPS 3
#define TWIN_LOSS_TOL 1e-4
#define TWIN_GRAD_TOL 1e-3

static moe_adamw_config adamw_config(void) {
    moe_adamw_config a;
    memset(&a, 0, sizeof a);
    a.beta1 = 0.9f; a.beta2 = 0.95f; a.eps = 1e-8f; a.weight_decay = 0.1f; a.moment_dtype = MOE_F32;
    return a;
}

typedef struct trainer {
    moe_ctx *ctx;
    moe_model *m;
    moe_adamw *o;
    int32_t *toks; /* [B, T+1] */
    int64_t B, T;
} trainer;

static void trainer_free(trainer *t) {
    free(t->toks);
    moe_adamw_free(t->ctx, t->o);
    moe_model_free(t->ctx, t->m);
    moe_ctx_free(t->ctx);
    memset(t, 0, sizeof *t);
}

/* The model of `config` (seed 1), its optimizer, and B·(T+1) tokens from a fixed stream: every
   row and the twin's files get the same weights and tokens. */
static int trainer_new(trainer *t, const char *config, const char *precision, int threads, int64_t B, int64_t T) {
    moe_config c;
    moe_adamw_config ac = adamw_config();
    moe_rng rng = moe_rng_new(7, 7);
    int64_t i;
    memset(t, 0, sizeof *t);
    t->B = B;
    t->T = T;
    if (moe_ctx_new(&t->ctx)) return 1;
    if (strcmp(config, "tiny") == 0) c = moe_config_tiny();
    else if (strcmp(config, "small") == 0) c = moe_config_small();
    else if (moe_config_load(t->ctx, config, &c)) goto fail;
    if (moe_ctx_set_threads(t->ctx, threads) ||
        moe_ctx_set_gemm_precision(t->ctx, strcmp(precision, "bf16") == 0 ? MOE_BF16 : MOE_F32) ||
        moe_model_new(t->ctx, &c, 1, &t->m) || moe_adamw_new(t->ctx, t->m, &ac, &t->o))
        goto fail;
    t->toks = (int32_t *)malloc(sizeof(int32_t) * (size_t)(B * (T + 1)));
    if (!t->toks) goto fail;
    for (i = 0; i < B * (T + 1); i++) t->toks[i] = (int32_t)(moe_rng_next(&rng) % (uint64_t)t->m->cfg.vocab_size);
    return 0;
fail:
    fprintf(stderr, "setup: %s\n", moe_ctx_error(t->ctx));
    trainer_free(t);
    return 1;
}

/* One training step: loss (CE + MTP + balance), backward, AdamW with clipping, expert biases.
   With grads_dir, the gradients before the update are written there (HF names). */
static int trainer_step(trainer *t, moe_loss_parts *parts, const char *grads_dir) {
    moe_loss_opts lo;
    moe_tensor *loss;
    lo.mtp_lambda = STEP_MTP_LAMBDA;
    lo.balance_alpha = STEP_BALANCE_ALPHA;
    if (moe_model_loss(t->ctx, t->m, t->toks, t->B, t->T, &lo, &loss, parts) || moe_backward(t->ctx, loss)) {
        fprintf(stderr, "step: %s\n", moe_ctx_error(t->ctx));
        return 1;
    }
    if (grads_dir) {
        moe_hf_save_opts so;
        memset(&so, 0, sizeof so);
        so.gradients = 1;
        if (mkdir(grads_dir, 0700) != 0 || moe_model_save_hf(t->ctx, t->m, grads_dir, &so)) {
            fprintf(stderr, "gradients to %s: %s\n", grads_dir, moe_ctx_error(t->ctx));
            return 1;
        }
    }
    moe_ctx_reset(t->ctx);
    if (moe_adamw_step(t->ctx, t->o, STEP_LR, 1.0f, STEP_CLIP, NULL) || moe_model_update_expert_bias(t->ctx, t->m, STEP_BIAS_GAMMA)) {
        fprintf(stderr, "step: %s\n", moe_ctx_error(t->ctx));
        return 1;
    }
    return 0;
}

/* One row, in this process: prints "ROW ms tokens_per_s flops peak_rss_mb". */
static int run_row(const char *config, const char *precision, int threads, int64_t B, int64_t T, double seconds) {
    trainer tr;
    double times[512], flops;
    int n = 0, i;
    struct rusage ru;
    if (trainer_new(&tr, config, precision, threads, B, T)) return 1;
    for (i = 0; i < 512; i++) {
        double t0 = moe_time_s(), total = 0;
        int j;
        if (trainer_step(&tr, NULL, NULL)) return 1;
        if (i >= 2) times[n++] = moe_time_s() - t0; /* two warm-up steps */
        for (j = 0; j < n; j++) total += times[j];
        if (n >= 3 && total > seconds) break;
    }
    qsort(times, (size_t)n, sizeof times[0], cmp_double);
    flops = step_flops(&tr.m->cfg, B, T, 1);
    getrusage(RUSAGE_SELF, &ru);
    printf("ROW %.3f %.1f %.6e %.1f\n", 1e3 * times[n / 2], (double)(B * T) / times[n / 2], flops, (double)ru.ru_maxrss / 1024.0);
    trainer_free(&tr);
    return 0;
}

/* Unit-scale weights for the check (as tests/parity does): at the N(0, 0.02²) initialisation
   attention is nearly uniform and RoPE, the attention scale or the routing rules move the loss
   by ~1e-5 of itself; here every term matters. Linear weights N(0, 1/fan_in), the embedding
   N(0, 1), norms 1 + 0.1·N(0, 1). Expert biases that make the routing rules matter: where the
   top-k must take more than one expert per kept group (tiny: k 4, 2 groups kept), most biased
   scores are made negative (one expert per group b in [0, 0.5), the others in [-1.2, -1.0)), so
   that masking the dropped groups with -inf (not 0) decides the top-k; elsewhere (small: k 4,
   4 groups kept) b is uniform in [-1.2, 0.5), so that the plain top-k would often take experts
   of dropped groups. */
static int unit_scale(trainer *t) {
    const moe_config *c = moe_model_config(t->m);
    moe_rng rng = moe_rng_new(11, 11);
    int64_t i, e, per = c->n_routed_experts / (c->n_group > 0 ? c->n_group : 1);
    for (i = 0; i < moe_model_tensor_count(t->m); i++) {
        const char *name;
        int is_param;
        moe_tensor *x = moe_model_tensor(t->m, i, &name, &is_param);
        moe_status st = MOE_OK;
        if (!is_param) { /* the expert biases */
            float *b = (float *)x->data;
            if (x->dtype != MOE_F32) return 1;
            if (c->num_experts_per_tok > c->topk_group) {
                for (e = 0; e < x->numel; e++) b[e] = -1.0f - 0.2f * moe_rng_uniform(&rng);
                for (e = 0; e + per <= x->numel; e += per) b[e + (int64_t)(moe_rng_next(&rng) % (uint64_t)per)] = 0.5f * moe_rng_uniform(&rng);
            } else {
                for (e = 0; e < x->numel; e++) b[e] = -1.2f + 1.7f * moe_rng_uniform(&rng);
            }
        } else if (x->ndim == 1) {
            st = moe_tensor_fill_normal(t->ctx, x, &rng, 1.0f, 0.1f);
        } else if (strcmp(name, "model.embed_tokens.weight") == 0) {
            st = moe_tensor_fill_normal(t->ctx, x, &rng, 0.0f, 1.0f);
        } else {
            st = moe_tensor_fill_normal(t->ctx, x, &rng, 0.0f, (float)(1.0 / sqrt((double)x->shape[x->ndim - 1])));
        }
        if (st) return 1;
    }
    return 0;
}

/* The twin's files, in this process: the initial weights (HF names) of the timed model in dir
   and of its unit-scale variant in dir/unit, the tokens, the step's hyper-parameters, moe.h's
   losses of the timed model's first CHECK_STEPS steps and of the unit-scale model's first, in
   FP32 and BF16, and the unit-scale model's FP32 gradients of its first step (dir/unit/grads). */
static int dump_twin(const char *dir, const char *config, int64_t B, int64_t T) {
    static const char *precs[2] = {"fp32", "bf16"}, *models[2] = {"init", "unit"};
    char path[4096];
    FILE *f, *lf;
    int p, s, k, w;
    moe_adamw_config ac = adamw_config();
    snprintf(path, sizeof path, "%s/losses.txt", dir);
    if (!(lf = fopen(path, "w"))) { perror(path); return 1; }
    for (w = 0; w < 2; w++)
        for (p = 0; p < 2; p++) {
            trainer tr;
            if (trainer_new(&tr, config, precs[p], 1, B, T)) return 1;
            if (w == 1 && unit_scale(&tr)) { fprintf(stderr, "unit_scale failed\n"); return 1; }
            if (p == 0) {
                snprintf(path, sizeof path, w ? "%s/unit" : "%s", dir);
                if ((w && mkdir(path, 0700) != 0) || moe_model_save_hf(tr.ctx, tr.m, path, NULL)) {
                    fprintf(stderr, "save %s: %s\n", path, moe_ctx_error(tr.ctx));
                    return 1;
                }
            }
            if (w == 0 && p == 0) {
                snprintf(path, sizeof path, "%s/tokens.i32", dir);
                if (!(f = fopen(path, "wb")) || fwrite(tr.toks, sizeof(int32_t), (size_t)(B * (T + 1)), f) != (size_t)(B * (T + 1))) {
                    perror(path);
                    return 1;
                }
                fclose(f);
                snprintf(path, sizeof path, "%s/run.txt", dir);
                if (!(f = fopen(path, "w"))) { perror(path); return 1; }
                fprintf(f, "batch %lld\nseq %lld\nlr %.9g\nclip %.9g\nmtp_lambda %.9g\nbalance_alpha %.9g\nbias_gamma %.9g\n"
                           "beta1 %.9g\nbeta2 %.9g\neps %.9g\nweight_decay %.9g\ncheck_steps %d\nloss_tol %.9g\ngrad_tol %.9g\n",
                        (long long)B, (long long)T, (double)STEP_LR, (double)STEP_CLIP, (double)STEP_MTP_LAMBDA, (double)STEP_BALANCE_ALPHA,
                        (double)STEP_BIAS_GAMMA, (double)ac.beta1, (double)ac.beta2, (double)ac.eps, (double)ac.weight_decay, CHECK_STEPS,
                        TWIN_LOSS_TOL, TWIN_GRAD_TOL);
                fclose(f);
            }
            /* the timed model: CHECK_STEPS steps; the unit-scale one: one step, and its gradients */
            for (s = 1; s <= (w ? 1 : CHECK_STEPS); s++) {
                moe_loss_parts parts;
                snprintf(path, sizeof path, "%s/unit/grads", dir);
                if (trainer_step(&tr, &parts, w == 1 && p == 0 ? path : NULL)) return 1;
                fprintf(lf, "%s %s %d total=%.9g main=%.9g balance=%.9g", models[w], precs[p], s, parts.total, parts.main, parts.balance);
                for (k = 0; k < tr.m->cfg.num_nextn_predict_layers && k < 4; k++) fprintf(lf, " mtp%d=%.9g", k + 1, parts.mtp[k]);
                fprintf(lf, "\n");
            }
            trainer_free(&tr);
        }
    fclose(lf);
    return 0;
}

static void remove_twin_dir(const char *dir) {
    static const char *files[] = {"unit/grads/model.safetensors", "unit/grads", "unit/config.json", "unit/model.safetensors",
                                  "unit", "config.json", "model.safetensors", "tokens.i32", "run.txt", "losses.txt"};
    char path[4096];
    size_t i;
    for (i = 0; i < sizeof files / sizeof files[0]; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, files[i]);
        remove(path); /* files and (emptied) directories alike */
    }
    rmdir(dir);
}

#define TWIN_SCRIPT "bench/train_step_torch.py"

/* The python that runs the twin, or NULL with the reason in why. */
static const char *twin_python(char *buf, size_t n, char *why, size_t nwhy) {
    const char *env = getenv("MOE_BENCH_PYTHON");
    FILE *p;
    char line[4096];
    if (access(TWIN_SCRIPT, R_OK) != 0) {
        snprintf(why, nwhy, "%s not found (run from the repository root)", TWIN_SCRIPT);
        return NULL;
    }
    if (env && *env) {
        snprintf(buf, n, "%s", env);
    } else {
        if (access("tests/parity/setup_venv.sh", R_OK) != 0) {
            snprintf(why, nwhy, "tests/parity/setup_venv.sh not found (run from the repository root)");
            return NULL;
        }
        fflush(stdout);
        buf[0] = 0;
        p = popen("bash tests/parity/setup_venv.sh", "r"); /* makes the venv once; progress on stderr */
        while (p && fgets(line, sizeof line, p)) {
            size_t len = strlen(line);
            while (len && (line[len - 1] == '\n' || line[len - 1] == '\r')) line[--len] = 0;
            if (len) snprintf(buf, n, "%s", line);
        }
        if (!p || pclose(p) != 0 || !buf[0]) {
            snprintf(why, nwhy, "the parity venv could not be made (tests/parity/setup_venv.sh failed)");
            return NULL;
        }
    }
    if (access(buf, X_OK) != 0) {
        snprintf(why, nwhy, "%s is not an executable python", buf);
        return NULL;
    }
    return buf;
}

/* Run the twin script with args; echo lines that start with "  " (its check table), keep the
   first line that starts with `key` in out. Returns 0 when the script exited 0 and gave it. */
static int run_twin(const char *python, const char *args, const char *key, char *out, size_t n) {
    char cmd[8192], line[1024];
    FILE *p;
    int found = 0;
    fflush(stdout);
    snprintf(cmd, sizeof cmd, "'%s' %s %s", python, TWIN_SCRIPT, args);
    p = popen(cmd, "r");
    while (p && fgets(line, sizeof line, p)) {
        if (strncmp(line, "  ", 2) == 0) fputs(line, stdout);
        if (!found && strncmp(line, key, strlen(key)) == 0) {
            snprintf(out, n, "%s", line);
            found = 1;
        }
    }
    if (!p) return 1;
    return pclose(p) != 0 || !found;
}

/* A number for the JSON line, or null when it was not measured (valid is 0). */
static const char *json_num(int valid, double x, const char *fmt, char *buf, size_t n) {
    if (valid) snprintf(buf, n, fmt, x);
    else snprintf(buf, n, "null");
    return buf;
}

int main(int argc, char **argv) {
    const char *config = NULL, *precision = NULL, *python = NULL;
    int threads = 0, i, quick = 0, no_torch = 0, rounds = 2;
    int64_t B = 0, T = 0;
    double seconds = 4.0, peak[3] = {0, 0, 0}, peak256[3] = {0, 0, 0}, peak512[3] = {0, 0, 0}, peak_bf16[3] = {0, 0, 0};
    const int bf16_kernel = moe__gemm_bf16_kernel_default();
    const char *bf16_name = bf16_kernel == MOE__BF16_AMX ? "amx" : bf16_kernel == MOE__BF16_DP ? "dp" : "fma";
    static char json[65536], twin_json[8192];
    char pybuf[4096], why[512] = "", why512[64] = "", cpu_json[512], torch_version[64] = "", torch_variants[64] = "";
    size_t used, tused = 0;
    bench_cpu cpu;
    for (i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--row") == 0 && i + 6 < argc) { /* internal: one row in this process */
            return run_row(argv[i + 1], argv[i + 2], atoi(argv[i + 3]), atoll(argv[i + 4]), atoll(argv[i + 5]), atof(argv[i + 6]));
        } else if (strcmp(argv[i], "--dump") == 0 && i + 4 < argc) { /* internal: the twin's files */
            return dump_twin(argv[i + 1], argv[i + 2], atoll(argv[i + 3]), atoll(argv[i + 4]));
        } else if (strcmp(argv[i], "--config") == 0 && i + 1 < argc) config = argv[++i];
        else if (strcmp(argv[i], "--precision") == 0 && i + 1 < argc) precision = argv[++i];
        else if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc) threads = atoi(argv[++i]);
        else if (strcmp(argv[i], "--batch") == 0 && i + 1 < argc) B = atoll(argv[++i]);
        else if (strcmp(argv[i], "--seq") == 0 && i + 1 < argc) T = atoll(argv[++i]);
        else if (strcmp(argv[i], "--seconds") == 0 && i + 1 < argc) seconds = atof(argv[++i]);
        else if (strcmp(argv[i], "--quick") == 0) quick = 1;
        else if (strcmp(argv[i], "--no-torch") == 0) no_torch = 1;
        else if (strcmp(argv[i], "--rounds") == 0 && i + 1 < argc && atoi(argv[i + 1]) >= 1 && atoi(argv[i + 1]) <= 16) rounds = atoi(argv[++i]);
        else {
            fprintf(stderr, "usage: train_step [--config tiny|small|FILE] [--batch B] [--seq T] [--precision fp32|bf16] [--threads N] "
                            "[--seconds S] [--rounds R] [--quick] [--no-torch]\n");
            return 2;
        }
    }
    if (quick) seconds = 1.5;
    bench_cpu_read(&cpu);
    printf("CPU: %s (%s)\n", cpu.model, cpu.id);
    if (no_torch) snprintf(why, sizeof why, "--no-torch");
    else python = twin_python(pybuf, sizeof pybuf, why, sizeof why);
    printf("PyTorch twin: %s%s\n", python ? python : "not run: ", python ? "" : why);
    {   /* the widest FMA the CPU runs at full rate: 512-bit doubles the peak on Intel's two-port
           cores, not on Zen 4 (it runs them as two 256-bit halves); MFU is against the faster */
        int t;
        for (t = 1; t <= 2; t++) {
            peak256[t] = bench_fma_peak_gflops(t, 256);
            peak512[t] = bench_fma_peak_gflops(t, 512);
            peak[t] = peak512[t] > peak256[t] ? peak512[t] : peak256[t];
            peak_bf16[t] = bf16_kernel == MOE__BF16_FMA ? peak[t] : bench_bf16_peak_gflops(t, bf16_kernel);
        }
    }
    printf("FP32 FMA peak (measured): 256-bit %.1f GFLOP/s on 1 thread, %.1f on 2; 512-bit %s; MFU against %.1f / %.1f\n",
           peak256[1], peak256[2],
           peak512[1] > 0 ? (snprintf(why512, sizeof why512, "%.1f on 1 thread, %.1f on 2", peak512[1], peak512[2]), why512)
                          : "not built (no AVX-512F)",
           peak[1], peak[2]);
    printf("BF16 kernel %s (MOE_GEMM_BF16), its peak (measured): %.1f GFLOP/s on 1 thread, %.1f on 2; BF16 rows' MFU against it\n",
           bf16_name, peak_bf16[1], peak_bf16[2]);
    printf("each row: %d round%s of (moe.h for %.3g s, then the twin for %.3g s), each side's best round (lowest median)\n", rounds,
           rounds > 1 ? "s" : "", seconds / rounds, seconds / rounds);
    used = (size_t)snprintf(json, sizeof json,
                            "{\"bench\":\"train_step\",%s,\"fma_peak_gflops\":{\"1\":%.1f,\"2\":%.1f},"
                            "\"fma_peak_gflops_256\":{\"1\":%.1f,\"2\":%.1f},\"fma_peak_gflops_512\":{\"1\":%.1f,\"2\":%.1f},"
                            "\"bf16_kernel\":\"%s\",\"bf16_peak_gflops\":{\"1\":%.1f,\"2\":%.1f},\"rows\":[",
                            bench_cpu_json(&cpu, cpu_json, sizeof cpu_json), peak[1], peak[2], peak256[1], peak256[2], peak512[1],
                            peak512[2], bf16_name, peak_bf16[1], peak_bf16[2]);
    {
        /* the rows: every combination of the given values, or of the defaults */
        const char *cfgs[2] = {"tiny", "small"}, *precs[2] = {"fp32", "bf16"};
        int ths[2] = {1, 2}, nc = 2, np = 2, nt = 2, ci, pi, ti;
        if (config) { cfgs[0] = config; nc = 1; }
        if (precision) { precs[0] = precision; np = 1; }
        if (threads) { ths[0] = threads; nt = 1; }
        for (ci = 0; ci < nc; ci++) {
            const char *cfg = cfgs[ci];
            int64_t b = B ? B : 8, t = T ? T : strcmp(cfg, "tiny") == 0 ? 32 : 128;
            char dir[] = "/tmp/moe_bench_twin_XXXXXX", args[6000], line[1024], esc[512];
            int twin_ok = 0, twin_dir = 0;
            double max_rel = -1, bf16_rel = -1, grad_rel = -1, tol = TWIN_LOSS_TOL, gtol = TWIN_GRAD_TOL;
            /* the twin: moe.h's initial weights and tokens, then its losses and gradients checked */
            printf("\n%s: B x T = %lld x %lld\n", cfg, (long long)b, (long long)t);
            if (python && mkdtemp(dir)) {
                twin_dir = 1;
                snprintf(args, sizeof args, "'%s' --dump '%s' '%s' %lld %lld", argv[0], dir, cfg, (long long)b, (long long)t);
                if (system(args) != 0) {
                    printf("  PyTorch twin: moe.h could not write its weights for the twin\n");
                } else {
                    char verdict[16] = "";
                    snprintf(args, sizeof args, "--dir '%s' --check --threads 2", dir);
                    if (run_twin(python, args, "CHECK ", line, sizeof line) == 0 &&
                        sscanf(line, "CHECK %15s %lf %lf %lf %lf %lf %63s %63s", verdict, &max_rel, &tol, &bf16_rel, &grad_rel, &gtol,
                               torch_version, torch_variants) == 8) {
                        twin_ok = strcmp(verdict, "ok") == 0;
                        printf("  PyTorch twin check: %s. FP32 losses within %.2g of moe.h's (relative; tolerance %.0e), gradients "
                               "within %.2g (tolerance %.0e); BF16 losses within %.2g (not gated); torch %s, variants %s\n",
                               twin_ok ? "PASS" : "FAIL (its rows are not timed)", max_rel, tol, grad_rel, gtol, bf16_rel, torch_version,
                               torch_variants);
                    } else {
                        printf("  PyTorch twin check: the twin did not run (see above); its fields are null\n");
                    }
                }
            }
            if (python) {
                char n1[32], n2[32], n3[32];
                tused += (size_t)snprintf(twin_json + tused, sizeof twin_json - tused,
                                          "%s\"%s\":{\"check_ok\":%s,\"fp32_loss_max_rel_diff\":%s,\"loss_tolerance\":%.1e,"
                                          "\"grad_max_rel_diff\":%s,\"grad_tolerance\":%.1e,\"bf16_loss_max_rel_diff\":%s}",
                                          tused ? "," : "", bench_json_escape(cfg, esc, sizeof esc), twin_ok ? "true" : "false",
                                          json_num(max_rel >= 0, max_rel, "%.3e", n1, sizeof n1), tol,
                                          json_num(grad_rel >= 0, grad_rel, "%.3e", n2, sizeof n2), gtol,
                                          json_num(bf16_rel >= 0, bf16_rel, "%.3e", n3, sizeof n3));
            }
            printf("%-8s %-5s %3s %6s %10s %10s %9s %7s %8s | %10s %10s %7s  %s\n", "config", "prec", "thr", "B x T", "ms/step", "tok/s",
                   "GFLOP/s", "MFU", "RSS MB", "torch ms", "torch tok/s", "ratio", "torch variant");
            for (pi = 0; pi < np; pi++)
                for (ti = 0; ti < nt; ti++) {
                    const char *prec = precs[pi];
                    int th = ths[ti], r;
                    char cmd[1024], bt[32], n1[32], n2[32], tvar[32] = "", rounds_json[256] = "", trounds_json[256] = "";
                    double ms = 1e300, tps = 0, fl = 0, rss = 0, gf, mfu, tms = -1, ttps = -1;
                    size_t rj = 0, trj = 0;
                    /* rounds of (moe.h row, twin row); each side's best round counts */
                    for (r = 0; r < rounds; r++) {
                        double ms_r, tps_r, fl_r, rss_r, tms_r, ttps_r;
                        char tvar_r[32];
                        FILE *p;
                        snprintf(cmd, sizeof cmd, "'%s' --row '%s' %s %d %lld %lld %g", argv[0], cfg, prec, th, (long long)b, (long long)t,
                                 seconds / rounds);
                        fflush(stdout);
                        p = popen(cmd, "r");
                        if (!p || !fgets(line, sizeof line, p) || sscanf(line, "ROW %lf %lf %lf %lf", &ms_r, &tps_r, &fl_r, &rss_r) != 4) {
                            fprintf(stderr, "row %s %s %d failed\n", cfg, prec, th);
                            if (p) pclose(p);
                            return 1;
                        }
                        pclose(p);
                        rj += (size_t)snprintf(rounds_json + rj, sizeof rounds_json - rj, "%s%.2f", r ? "," : "", ms_r);
                        if (ms_r < ms) { ms = ms_r; tps = tps_r; fl = fl_r; rss = rss_r; }
                        /* the twin right after, on the same weights and tokens */
                        if (!twin_ok) continue;
                        snprintf(args, sizeof args, "--dir '%s' --precision %s --threads %d --seconds %g", dir, prec, th, seconds / rounds);
                        if (run_twin(python, args, "ROW ", line, sizeof line) != 0 || sscanf(line, "ROW %lf %lf %31s", &tms_r, &ttps_r, tvar_r) != 3) {
                            printf("  PyTorch twin: the %s row at %d threads did not run\n", prec, th);
                            continue;
                        }
                        trj += (size_t)snprintf(trounds_json + trj, sizeof trounds_json - trj, "%s%.2f", trj ? "," : "", tms_r);
                        if (tms < 0 || tms_r < tms) { tms = tms_r; ttps = ttps_r; snprintf(tvar, sizeof tvar, "%s", tvar_r); }
                    }
                    gf = fl / (ms / 1e3) / 1e9;
                    mfu = gf / (strcmp(prec, "bf16") == 0 ? peak_bf16 : peak)[th >= 2 ? 2 : 1];
                    snprintf(bt, sizeof bt, "%lldx%lld", (long long)b, (long long)t);
                    printf("%-8s %-5s %3d %6s %10.1f %10.0f %9.1f %7.3f %8.1f | ", cfg, prec, th, bt, ms, tps, gf, mfu, rss);
                    if (ttps > 0) printf("%10.1f %10.0f %7.2f  %s\n", tms, ttps, tps / ttps, tvar);
                    else printf("%10s %10s %7s\n", "-", "-", "-");
                    used += (size_t)snprintf(json + used, sizeof json - used,
                                             "%s{\"config\":\"%s\",\"precision\":\"%s\",\"threads\":%d,\"batch\":%lld,\"seq\":%lld,"
                                             "\"ms_per_step\":%.2f,\"tokens_per_s\":%.1f,\"gflops\":%.2f,\"mfu\":%.4f,\"peak_rss_mb\":%.1f,"
                                             "\"pytorch_tokens_per_s\":%s,\"ratio_vs_pytorch\":%s,\"pytorch_variant\":%s%s%s,"
                                             "\"ms_per_step_rounds\":[%s],\"pytorch_ms_per_step_rounds\":[%s]}",
                                             json[used - 1] == '}' ? "," : "", bench_json_escape(cfg, esc, sizeof esc), prec, th, (long long)b,
                                             (long long)t, ms, tps, gf, mfu, rss, json_num(ttps > 0, ttps, "%.1f", n1, sizeof n1),
                                             json_num(ttps > 0, ttps > 0 ? tps / ttps : 0, "%.4f", n2, sizeof n2), ttps > 0 ? "\"" : "",
                                             ttps > 0 ? tvar : "null", ttps > 0 ? "\"" : "", rounds_json, trounds_json);
                    fflush(stdout);
                }
            if (twin_dir) remove_twin_dir(dir);
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
    printf("CPU: %s. ratio = moe.h tokens/s / PyTorch tokens/s, the same step in the same run%s\n", cpu.model,
           python && torch_version[0] ? "" : " (no PyTorch twin: null)");
    if (python && !torch_version[0]) snprintf(why, sizeof why, "the twin did not run (%s failed with %s)", TWIN_SCRIPT, python);
    if (python && torch_version[0])
        printf("%s],\"pytorch\":{\"torch\":\"%s\",\"variants\":\"%s\",\"configs\":{%s}}}\n", json, torch_version, torch_variants, twin_json);
    else
        printf("%s],\"pytorch\":null,\"pytorch_unavailable\":\"%s\"}\n", json, bench_json_escape(why, cpu_json, sizeof cpu_json));
    return 0;
}
