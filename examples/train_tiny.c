/* examples/train_tiny.c — train a DeepSeek-V3-shaped model on the bundled corpus.

   The model has every structural feature of V3 at toy size (reference §12.1): MLA with q and
   kv compression, a dense first layer then DeepSeekMoE layers with a shared expert and 16
   routed experts in 4 groups of which 2 are kept, sigmoid routing with bias-based balancing,
   and one MTP module. Byte-level tokens; the data is data/austen.txt unless --data says.

       ./build.sh run                       # the defaults below, about four minutes on 2 cores
       ./build.sh example train_tiny --help

   It prints a progress line, writes OUT/log.csv, OUT/ckpt.bin (for --resume) and OUT/hf/ (a
   Hugging Face DeepseekV3 directory), and ends with a text sample, a summary (validation bits
   per byte next to xz's on the same text) and one JSON line. */
#define MOE_IMPLEMENTATION
#include "moe.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

typedef struct options {
    const char *config, *data, *out, *precision, *moments, *resume;
    long steps, batch, seq, threads, accum, val_every, val_batches, sample_tokens, fp8_block;
    double lr, lr_min, gamma, alpha, lambda, clip, seconds;
    unsigned long long seed;
    int warmup;
} options;

static void usage(FILE *f) {
    fprintf(f,
            "usage: train_tiny [flags]\n"
            "  --config FILE      Hugging Face style config.json (default: the tiny config of reference 12.1)\n"
            "  --data FILE        text file (one token per byte) or llm.c .bin shard (default data/austen.txt)\n"
            "  --steps N          optimizer steps (default 4500)\n"
            "  --seconds S        stop early after S seconds of training (default 200; 0 = no limit)\n"
            "  --batch B          sequences per micro-batch (default 16)\n"
            "  --seq T            tokens per sequence (default 64, at most max_position_embeddings)\n"
            "  --accum N          micro-batches per step (default 1)\n"
            "  --lr X             peak learning rate (default 3e-3; warm-up then cosine to lr/10)\n"
            "  --warmup N         warm-up steps (default 50)\n"
            "  --seed N           seed of the initialisation and the data order (default 1)\n"
            "  --precision P      fp32, bf16, fp8 (DeepSeek-V3 recipe: E4M3 linear layers, 1xB / BxB scales)\n"
            "                     or fp8-tensor (one FP8 scale per tensor, an ablation) (default fp32)\n"
            "  --fp8-block N      FP8 tile / block size B (default 128)\n"
            "  --moments M        AdamW moments in fp32 or bf16 (default fp32)\n"
            "  --threads N        worker threads (default: all cores)\n"
            "  --gamma X          expert-bias update speed (default 1e-3; 0 turns balancing off)\n"
            "  --alpha X          sequence-wise balance loss weight (default 1e-4)\n"
            "  --lambda X         MTP loss weight (default 0.3)\n"
            "  --clip X           global gradient-norm clip (default 1.0)\n"
            "  --val-every N      steps between validation estimates (default 100)\n"
            "  --out DIR          where log.csv and ckpt.bin go (default out/train_tiny)\n"
            "  --resume FILE      continue from a checkpoint written by this program\n"
            "  --sample N         bytes to generate at the end (default 300)\n"
            "  --help             this text\n");
}

static int parse_args(int argc, char **argv, options *o) {
    int i;
    memset(o, 0, sizeof *o);
    o->data = "data/austen.txt"; o->out = "out/train_tiny"; o->precision = "fp32"; o->moments = "fp32"; o->fp8_block = 128;
    o->steps = 4500; o->seconds = 200; o->batch = 16; o->seq = 64; o->accum = 1; o->lr = 3e-3; o->warmup = 50;
    o->seed = 1; o->threads = 0; o->gamma = 1e-3; o->alpha = 1e-4; o->lambda = 0.3; o->clip = 1.0;
    o->val_every = 100; o->val_batches = 8; o->sample_tokens = 300;
    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        char *end = NULL;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) { usage(stdout); exit(0); }
        if (!v) { fprintf(stderr, "train_tiny: %s needs a value (see --help)\n", a); return 0; }
        i++;
#define NUM(flag, field, conv, lo)                                                                            \
    if (strcmp(a, flag) == 0) {                                                                                \
        o->field = conv(v, &end);                                                                              \
        if (!end || *end || o->field < lo) { fprintf(stderr, "train_tiny: %s wants a number >= %g, got '%s'\n", flag, (double)(lo), v); return 0; } \
        continue;                                                                                              \
    }
#define LNG(s, e) strtol(s, e, 10)
#define DBL(s, e) strtod(s, e)
        NUM("--steps", steps, LNG, 1) NUM("--batch", batch, LNG, 1) NUM("--seq", seq, LNG, 2) NUM("--threads", threads, LNG, 1)
        NUM("--accum", accum, LNG, 1) NUM("--val-every", val_every, LNG, 1) NUM("--sample", sample_tokens, LNG, 0)
        NUM("--lr", lr, DBL, 0) NUM("--gamma", gamma, DBL, 0) NUM("--alpha", alpha, DBL, 0) NUM("--lambda", lambda, DBL, 0)
        NUM("--clip", clip, DBL, 0) NUM("--seconds", seconds, DBL, 0) NUM("--warmup", warmup, LNG, 0)
        NUM("--fp8-block", fp8_block, LNG, 1)
        if (strcmp(a, "--seed") == 0) {
            o->seed = strtoull(v, &end, 10);
            if (!end || *end || *v == '-') { fprintf(stderr, "train_tiny: --seed wants a non-negative integer, got '%s'\n", v); return 0; }
            continue;
        }
        if (strcmp(a, "--config") == 0) { o->config = v; continue; }
        if (strcmp(a, "--data") == 0) { o->data = v; continue; }
        if (strcmp(a, "--out") == 0) { o->out = v; continue; }
        if (strcmp(a, "--resume") == 0) { o->resume = v; continue; }
        if (strcmp(a, "--precision") == 0) {
            if (strcmp(v, "fp32") && strcmp(v, "bf16") && strcmp(v, "fp8") && strcmp(v, "fp8-tensor")) {
                fprintf(stderr, "train_tiny: --precision is fp32, bf16, fp8 or fp8-tensor, got '%s'\n", v);
                return 0;
            }
            o->precision = v;
            continue;
        }
        if (strcmp(a, "--moments") == 0) {
            if (strcmp(v, "fp32") && strcmp(v, "bf16")) { fprintf(stderr, "train_tiny: --moments is fp32 or bf16, got '%s'\n", v); return 0; }
            o->moments = v;
            continue;
        }
        fprintf(stderr, "train_tiny: unknown flag '%s' (see --help)\n", a);
        return 0;
    }
    return 1;
}

/* mkdir -p */
static void make_dirs(const char *dir) {
    char p[1024];
    size_t i;
    snprintf(p, sizeof p, "%s", dir);
    for (i = 1; p[i]; i++)
        if (p[i] == '/') {
            p[i] = 0;
            mkdir(p, 0755);
            p[i] = '/';
        }
    mkdir(p, 0755);
}

#define CHECK(call)                                                                                   \
    do {                                                                                              \
        moe_status s_ = (call);                                                                       \
        if (s_ != MOE_OK) {                                                                           \
            fprintf(stderr, "\ntrain_tiny: %s: %s\n", moe_status_name(s_), moe_ctx_error(ctx));       \
            return 1;                                                                                 \
        }                                                                                             \
    } while (0)

/* Mean next-token loss (nats) over `batches` validation batches starting at batch `first`. */
static moe_status val_loss(moe_ctx *ctx, moe_model *m, const moe_dataset *d, long first, long batches, long B, long T,
                           int32_t *buf, double *out) {
    double sum = 0;
    long i;
    moe_status s = MOE_OK;
    moe_ctx_set_grad_enabled(ctx, 0);
    for (i = 0; i < batches && s == MOE_OK; i++) {
        moe_tensor *loss;
        moe_loss_parts parts;
        parts.main = 0;
        s = moe_data_batch(ctx, d, 1, 0, first + i, B, T, buf);
        if (s == MOE_OK) s = moe_model_loss(ctx, m, buf, B, T, NULL, &loss, &parts);
        sum += parts.main;
        moe_ctx_reset(ctx);
    }
    moe_ctx_set_grad_enabled(ctx, 1);
    moe_model_reset_loads(m);
    *out = sum / (double)batches;
    return s;
}

/* xz -9e's bits per byte on the validation text (-1 when xz is not there). */
static double xz_bits_per_byte(const moe_dataset *d, const char *dir) {
    char path[1024], cmd[2200];
    FILE *f;
    long n = (long)(d->n_tokens - d->n_train), i, bytes = -1;
    snprintf(path, sizeof path, "%s/val.txt", dir);
    f = fopen(path, "wb");
    if (!f) return -1;
    for (i = 0; i < n; i++) fputc(d->tokens[d->n_train + i] & 0xFF, f);
    fclose(f);
    snprintf(cmd, sizeof cmd, "xz -9e -c '%s' 2>/dev/null | wc -c", path);
    f = popen(cmd, "r");
    if (!f) return -1;
    if (fscanf(f, "%ld", &bytes) != 1) bytes = -1;
    pclose(f);
    remove(path);
    return bytes > 0 ? 8.0 * (double)bytes / (double)n : -1;
}

/* Greedy-ish sampling (temperature 0.8) from a prompt, full forward per token. */
static moe_status sample(moe_ctx *ctx, moe_model *m, const char *prompt, long n, unsigned long long seed, char *out) {
    int32_t toks[4096];
    long len = (long)strlen(prompt), i, ctxlen = moe_model_config(m)->max_position_embeddings;
    moe_rng rng = moe_rng_new(seed, 99);
    moe_status s = MOE_OK;
    for (i = 0; i < len; i++) toks[i] = (unsigned char)prompt[i];
    moe_ctx_set_grad_enabled(ctx, 0);
    for (i = 0; i < n && s == MOE_OK && len < 4096; i++) {
        long start = len > ctxlen ? len - ctxlen : 0, T = len - start, v, V = moe_model_config(m)->vocab_size;
        moe_tensor *logits;
        double mx = -1e30, z = 0, u, acc = 0;
        s = moe_model_logits(ctx, m, toks + start, 1, T, &logits);
        if (s != MOE_OK) break;
        for (v = 0; v < V; v++) mx = moe_tensor_get(logits, (T - 1) * V + v) > mx ? moe_tensor_get(logits, (T - 1) * V + v) : mx;
        for (v = 0; v < V; v++) z += exp((moe_tensor_get(logits, (T - 1) * V + v) - mx) / 0.8);
        u = moe_rng_uniform(&rng) * z;
        for (v = 0; v < V - 1; v++) {
            acc += exp((moe_tensor_get(logits, (T - 1) * V + v) - mx) / 0.8);
            if (acc >= u) break;
        }
        toks[len++] = (int32_t)v;
        out[i] = (char)(v >= 32 && v < 127 ? v : v == '\n' ? '\n' : '?');
        moe_ctx_reset(ctx);
    }
    out[i] = 0;
    moe_ctx_set_grad_enabled(ctx, 1);
    moe_model_reset_loads(m);
    return s;
}

int main(int argc, char **argv) {
    options o;
    moe_ctx *ctx = NULL;
    moe_config cfg = moe_config_tiny();
    moe_model *m = NULL;
    moe_adamw *opt = NULL;
    moe_dataset *data = NULL;
    moe_adamw_config ac;
    moe_lr_schedule sched;
    moe_loss_opts lo;
    moe_train_state st;
    int32_t *batch;
    char path[1024], text[4096];
    FILE *csv;
    double t0, vl = -1, last_vio = 0, train_s = 0, final_bpb, xz_bpb, ema = 0;
    long step, stopped_at;
    int64_t total = 0, active = 0, mtp = 0;
    int tty = isatty(2);

    if (!parse_args(argc, argv, &o)) return 2;
    if (moe_ctx_new(&ctx) != MOE_OK) return 1;
    if (o.threads) CHECK(moe_ctx_set_threads(ctx, (int)o.threads));
    if (strncmp(o.precision, "fp8", 3) == 0) {
        moe_fp8_options f8;
        memset(&f8, 0, sizeof f8);
        f8.block = o.fp8_block;
        f8.per_tensor = strcmp(o.precision, "fp8-tensor") == 0;
        CHECK(moe_ctx_set_fp8(ctx, &f8));
        CHECK(moe_ctx_set_gemm_precision(ctx, MOE_FP8_E4M3));
    } else {
        CHECK(moe_ctx_set_gemm_precision(ctx, strcmp(o.precision, "bf16") == 0 ? MOE_BF16 : MOE_F32));
    }
    if (o.config) CHECK(moe_config_load(ctx, o.config, &cfg));
    if (o.resume) CHECK(moe_ckpt_config(ctx, o.resume, &cfg));
    if (o.seq > cfg.max_position_embeddings) {
        fprintf(stderr, "train_tiny: --seq %ld exceeds max_position_embeddings %lld\n", o.seq, (long long)cfg.max_position_embeddings);
        return 2;
    }
    CHECK(moe_data_load(ctx, o.data, 0.1, &data));
    if (data->vocab > cfg.vocab_size) {
        fprintf(stderr, "train_tiny: the data has tokens up to %lld but vocab_size is %lld\n", (long long)data->vocab - 1, (long long)cfg.vocab_size);
        return 2;
    }
    CHECK(moe_model_new(ctx, &cfg, o.seed, &m));
    memset(&ac, 0, sizeof ac);
    ac.moment_dtype = strcmp(o.moments, "bf16") == 0 ? MOE_BF16 : MOE_F32;
    CHECK(moe_adamw_new(ctx, m, &ac, &opt));
    memset(&st, 0, sizeof st);
    st.seed = o.seed;
    if (o.resume) {
        CHECK(moe_ckpt_load(ctx, o.resume, m, opt, &st));
        fprintf(stderr, "resumed from %s at step %lld\n", o.resume, (long long)st.step);
    }
    make_dirs(o.out);
    snprintf(path, sizeof path, "%s/log.csv", o.out);
    csv = fopen(path, st.step ? "a" : "w");
    if (!csv) { fprintf(stderr, "train_tiny: cannot write %s\n", path); return 1; }
    if (!st.step) fprintf(csv, "step,lr,loss,main_loss,mtp_loss,val_loss,grad_norm,max_vio,tokens_per_s\n");
    memset(&sched, 0, sizeof sched);
    sched.shape = MOE_LR_COSINE; sched.lr_max = (float)o.lr; sched.lr_min = (float)o.lr / 10;
    sched.warmup_steps = o.warmup; sched.total_steps = o.steps;
    lo.mtp_lambda = (float)o.lambda;
    lo.balance_alpha = (float)o.alpha;
    batch = (int32_t *)malloc(sizeof(int32_t) * (size_t)(o.batch * (o.seq + 1)));
    moe_model_param_counts(m, &total, &active, &mtp);
    fprintf(stderr, "model: %lld parameters (%lld active per token) + %lld in MTP; data: %s, %lld train / %lld validation tokens\n",
            (long long)total, (long long)active, (long long)mtp, o.data, (long long)data->n_train, (long long)(data->n_tokens - data->n_train));
    fprintf(stderr, "training: %ld steps of %ld x %ld x %ld tokens, %s, %d threads\n", o.steps, o.accum, o.batch, o.seq,
            o.precision, moe_ctx_threads(ctx));

    t0 = moe_time_s();
    for (step = (long)st.step; step < o.steps; step++) {
        double ts = moe_time_s(), loss_sum = 0, main_sum = 0, mtp_sum = 0, tps, eta;
        float gn = 0, lr = moe_lr_at(&sched, step);
        long a;
        for (a = 0; a < o.accum; a++) {
            moe_tensor *loss;
            moe_loss_parts parts;
            CHECK(moe_data_batch(ctx, data, 0, st.seed, st.data_index++, o.batch, o.seq, batch));
            CHECK(moe_model_loss(ctx, m, batch, o.batch, o.seq, &lo, &loss, &parts));
            CHECK(moe_backward(ctx, loss));
            moe_ctx_reset(ctx);
            loss_sum += parts.total;
            main_sum += parts.main;
            mtp_sum += parts.mtp[0];
        }
        CHECK(moe_adamw_step(ctx, opt, lr, 1.0f / (float)o.accum, (float)o.clip, &gn));
        last_vio = moe_model_max_vio(m);
        CHECK(moe_model_update_expert_bias(ctx, m, (float)o.gamma));
        st.step = step + 1;
        st.tokens_seen += (double)(o.accum * o.batch * o.seq);
        train_s += moe_time_s() - ts;
        ema = step == (long)0 || ema == 0 ? main_sum / (double)o.accum : 0.95 * ema + 0.05 * main_sum / (double)o.accum;
        if ((step + 1) % o.val_every == 0 || step + 1 == o.steps)
            CHECK(val_loss(ctx, m, data, 0, o.val_batches, o.batch, o.seq, batch, &vl));
        tps = (double)(o.accum * o.batch * o.seq) * (double)(step + 1 - (long)0) / (train_s > 0 ? train_s : 1);
        eta = (double)(o.steps - step - 1) * train_s / (double)(step + 1);
        if (o.seconds > 0 && eta > o.seconds - train_s) eta = o.seconds - train_s;
        fprintf(csv, "%ld,%.6g,%.6f,%.6f,%.6f,%.6f,%.4f,%.4f,%.0f\n", step + 1, (double)lr, loss_sum / (double)o.accum,
                main_sum / (double)o.accum, mtp_sum / (double)o.accum, vl, (double)gn, last_vio, tps);
        if (tty || (step + 1) % o.val_every == 0 || step + 1 == o.steps) {
            int bar = (int)(30 * (step + 1) / o.steps), i;
            char bars[31];
            for (i = 0; i < 30; i++) bars[i] = i < bar ? '#' : '.';
            bars[30] = 0;
            fprintf(stderr, "%s[%s] step %5ld/%ld  loss %.3f  val %.3f  %6.0f tok/s  ETA %4.0fs  MaxVio %.2f%s", tty ? "\r" : "",
                    bars, step + 1, o.steps, ema, vl, tps, eta > 0 ? eta : 0, last_vio, tty ? "  " : "\n");
        }
        if (o.seconds > 0 && train_s >= o.seconds) {
            step++;
            break;
        }
    }
    stopped_at = (long)st.step;
    if (tty) fprintf(stderr, "\n");
    fclose(csv);
    snprintf(path, sizeof path, "%s/ckpt.bin", o.out);
    CHECK(moe_ckpt_save(ctx, path, m, opt, &st));
    {
        char hf[1024];
        snprintf(hf, sizeof hf, "%s/hf", o.out);
        make_dirs(hf);
        CHECK(moe_model_save_hf(ctx, m, hf, NULL)); /* config.json + model.safetensors for transformers */
    }

    /* the whole validation text, window by window */
    {
        long windows = (long)((data->n_tokens - data->n_train - 1) / o.seq), B = o.batch, nb = windows / B;
        CHECK(val_loss(ctx, m, data, 0, nb, B, o.seq, batch, &vl));
        final_bpb = vl / log(2.0);
    }
    xz_bpb = xz_bits_per_byte(data, o.out);
    CHECK(sample(ctx, m, "It is a truth universally acknowledged, ", o.sample_tokens, o.seed, text));
    printf("\n--- sample ---\nIt is a truth universally acknowledged, %s\n--------------\n", text);
    printf("trained %ld steps (%.0f tokens) in %.1f s; checkpoint %s\n", stopped_at, st.tokens_seen, moe_time_s() - t0, path);
    printf("validation: %.4f bits per byte (model)  vs  %.4f (xz -9e) on the same %lld bytes; MaxVio %.3f\n", final_bpb,
           xz_bpb, (long long)(data->n_tokens - data->n_train), last_vio);
    printf("{\"job\":\"train_tiny\",\"steps\":%ld,\"seconds\":%.1f,\"val_bpb\":%.4f,\"xz_bpb\":%.4f,\"max_vio\":%.4f}\n",
           stopped_at, moe_time_s() - t0, final_bpb, xz_bpb, last_vio);
    free(batch);
    moe_adamw_free(ctx, opt);
    moe_model_free(ctx, m);
    moe_data_free(ctx, data);
    moe_ctx_free(ctx);
    return 0;
}
