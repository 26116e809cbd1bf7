/* examples/train_tiny.c — train a DeepSeek-V3-shaped model on the bundled corpus.

   The model has every structural feature of V3 at toy size (reference §12.1): MLA with q and
   kv compression, a dense first layer then DeepSeekMoE layers with a shared expert and 16
   routed experts in 4 groups of which 2 are kept, sigmoid routing with bias-based balancing,
   and one MTP module; by default with twice the reference's FFN widths (dense 256, experts
   64) and 128 positions, the best validation per second of training of the shapes measured
   on 2 cores (README, "The tiny trainer"). Byte-level tokens; the data is data/austen.txt
   unless --data says.

       ./build.sh run                       # the defaults below, about four minutes on 2 cores
       ./build.sh run --resume auto         # continue the run in OUT after a kill or Ctrl-C
       ./build.sh example train_tiny --help

   It prints a progress line, writes OUT/log.csv, checkpoints OUT/ckpt-<step>.bin while it
   trains (the newest also as OUT/ckpt.bin) and at the end OUT/hf-<step>/ (a Hugging Face
   DeepseekV3 directory; OUT/hf links to it), and ends with a text sample, a summary
   (validation bits per byte next to xz's on the same text) and one JSON line.

   Faults. A step whose loss or gradient norm is not finite, or more than --skip-loss-z
   (--skip-grad-z) standard deviations above the mean of the last --skip-window steps' losses
   (gradient norms), is skipped: no weight, moment,
   expert bias or step count changes (its batch is consumed). --max-skips skipped steps in a
   row stop the run. SIGINT / SIGTERM finish the step, save and exit. A resumed run (--resume)
   continues bit-identically: the checkpoint holds the weights, AdamW moments, expert biases,
   step, data position, the schedule's length, the settings below that decide the weights and
   the spike guard's window.

   Data parallelism. Built with mpicc -DMOE_MPI and started by mpirun (./build.sh run --np P),
   each of the P ranks trains on its --accum / P of the step's micro-batches, the gradients
   are summed over the ranks in rank order and the expert loads summed (moe_model_reduce_grads),
   and every rank takes the same step; rank 0 writes the log and the checkpoints, rank r > 0
   its messages to OUT/rank-r.log. With --accum P (one micro-batch per rank) the checkpoints
   are byte-identical to one process with --accum P; a checkpoint resumes on any P dividing
   --accum.

   Exit status: 0 done (all steps, or --seconds reached), 1 error, 2 bad flags, 3 stopped by
   the spike guard (--max-skips skipped steps in a row; the last good state is saved),
   75 interrupted by SIGINT or SIGTERM (a checkpoint of the finished steps is saved). */
#define _XOPEN_SOURCE 700 /* sigaction's SA_RESTART, link, symlink */
#define MOE_IMPLEMENTATION
#include "moe.h"

#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* The flags a resume takes from the checkpoint unless they are given again. */
enum {
    G_STEPS = 1 << 0, G_BATCH = 1 << 1, G_SEQ = 1 << 2, G_ACCUM = 1 << 3, G_LR = 1 << 4, G_WARMUP = 1 << 5, G_GAMMA = 1 << 6,
    G_ALPHA = 1 << 7, G_LAMBDA = 1 << 8, G_CLIP = 1 << 9, G_PRECISION = 1 << 10, G_FP8_BLOCK = 1 << 11, G_MOMENTS = 1 << 12,
    G_SEED = 1 << 13, G_SKIP_Z = 1 << 14, G_WINDOW = 1 << 15, G_MAX_SKIPS = 1 << 16, G_SKIP_GRAD_Z = 1 << 17
};

#define MAX_INJECT 16
typedef struct options {
    const char *config, *data, *out, *resume, *device;
    long steps, batch, seq, threads, accum, val_every, val_batches, sample_tokens, fp8_block, warmup;
    long save_every, keep, window, max_skips, zero, ep, ep_fp8;
    long precision, moments; /* indices into the names below */
    double lr, gamma, alpha, lambda, clip, seconds, save_seconds, skip_z, skip_grad_z; /* skip_z: the loss's */
    unsigned long long seed;
    unsigned given; /* G_* of the flags on the command line */
    int n_inject;
    struct { int kind; long from, to; } inject[MAX_INJECT]; /* testing aid: faults at these attempts */
} options;

static const char *const precisions[] = {"fp32", "bf16", "fp8", "fp8-tensor"};
static const char *const moment_types[] = {"fp32", "bf16"};
enum { INJECT_NAN_LOSS, INJECT_NAN_GRAD, INJECT_SPIKE };
static const char *const inject_kinds[] = {"nan-loss", "nan-grad", "spike"};

static void usage(FILE *f) {
    fprintf(f,
            "usage: train_tiny [flags]\n"
            "  --config FILE      Hugging Face style config.json (default: the tiny config of reference 12.1\n"
            "                     with FFN widths 256 / 64 and 128 positions)\n"
            "  --data FILE        text file (one token per byte) or llm.c .bin shard (default data/austen.txt)\n"
            "  --steps N          optimizer steps: the cosine schedule spans them (default 5400)\n"
            "  --seconds S        stop after S seconds of training in this run (default 260; 0 = no limit)\n"
            "  --batch B          sequences per micro-batch (default 8)\n"
            "  --seq T            tokens per sequence (default 128, at most max_position_embeddings)\n"
            "  --accum N          micro-batches per step (default 1)\n"
            "  --lr X             peak learning rate (default 2e-3; warm-up then cosine to lr/10)\n"
            "  --warmup N         warm-up steps (default 50)\n"
            "  --seed N           seed of the initialisation and the data order (default 1)\n"
            "  --precision P      fp32, bf16, fp8 (DeepSeek-V3 recipe: E4M3 linear layers, 1xB / BxB scales)\n"
            "                     or fp8-tensor (one FP8 scale per tensor, an ablation) (default fp32)\n"
            "  --fp8-block N      FP8 tile / block size B (default 128)\n"
            "  --moments M        AdamW moments in fp32 or bf16 (default fp32)\n"
            "  --threads N        worker threads (default: all cores)\n"
            "  --device D         cpu (default), cuda or cuda:N (a build with the CUDA backend: ./build.sh cuda)\n"
            "  --zero 1           under mpirun: ZeRO-1, each rank keeps the AdamW moments of its shard of the\n"
            "                     parameters (default 0: every rank keeps all); the same bits either way\n"
            "  --ep N             under mpirun: expert parallelism, each group of N consecutive ranks spreads the\n"
            "                     routed experts' compute over its ranks (default 1: every rank runs all)\n"
            "  --ep-fp8 1        with --ep and --precision fp8: DeepSeek-V3's payloads, rows dispatched in E4M3 with\n"
            "                     1xB scales, outputs and gradients exchanged in BF16 (less than half the bytes;\n"
            "                     no longer bit-identical to one process)\n"
            "  --gamma X          expert-bias update speed (default 1e-3; 0 turns balancing off)\n"
            "  --alpha X          sequence-wise balance loss weight (default 1e-4)\n"
            "  --lambda X         MTP loss weight (default 0.3)\n"
            "  --clip X           global gradient-norm clip (default 1.0)\n"
            "  --val-every N      steps between validation estimates (default 100)\n"
            "  --out DIR          where log.csv, the checkpoints and the HF export go (default out/train_tiny)\n"
            "  --save-every N     checkpoint every N steps (default 500; 0 = only at the end)\n"
            "  --save-every-seconds S  and at least every S seconds (default 120; 0 = off)\n"
            "  --keep K           keep the newest K checkpoints OUT/ckpt-<step>.bin (default 3; 0 = all)\n"
            "  --resume auto|FILE continue from the newest valid checkpoint in OUT (auto: a fresh start when\n"
            "                     there is none) or from FILE; the settings that decide the weights come from the\n"
            "                     checkpoint unless given again. Without --resume, OUT's checkpoints are removed\n"
            "  --skip-loss-z Z    skip a step whose loss is Z standard deviations above the mean of the last\n"
            "                     --skip-window steps' losses (default 8; 0 = off: only a non-finite loss is skipped)\n"
            "  --skip-grad-z Z    the same for the gradient norm (default 50; 0 = off)\n"
            "  --skip-window N    steps in that window (default 64, at most 200)\n"
            "  --max-skips M      stop (exit status 3) after M skipped steps in a row (default 20)\n"
            "  --inject K@A[-B]   testing aid: a fault at attempts A..B (1-based, skipped ones count), K one of\n"
            "                     nan-loss, nan-grad, spike (gradients x1000); comma-separated list; under\n"
            "                     mpirun nan-loss strikes rank 0 alone\n"
            "  --sample N         bytes to generate at the end (default 300)\n"
            "  --help             this text\n"
            "exit status: 0 done, 1 error, 2 bad flags, 3 too many skipped steps in a row, 75 interrupted (saved)\n");
}

static int parse_inject(const char *v, options *o) {
    char buf[512], *tok, *save = NULL;
    snprintf(buf, sizeof buf, "%s", v);
    for (tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        char *at = strchr(tok, '@'), *end = NULL;
        int k, kind = -1;
        if (!at || o->n_inject == MAX_INJECT) return 0;
        *at = 0;
        for (k = 0; k < 3; k++)
            if (strcmp(tok, inject_kinds[k]) == 0) kind = k;
        if (kind < 0) return 0;
        o->inject[o->n_inject].kind = kind;
        o->inject[o->n_inject].from = o->inject[o->n_inject].to = strtol(at + 1, &end, 10);
        if (end && *end == '-') o->inject[o->n_inject].to = strtol(end + 1, &end, 10);
        if (!end || *end || o->inject[o->n_inject].from < 1 || o->inject[o->n_inject].to < o->inject[o->n_inject].from) return 0;
        o->n_inject++;
    }
    return 1;
}

static int parse_args(int argc, char **argv, options *o) {
    int i;
    memset(o, 0, sizeof *o);
    o->data = "data/austen.txt"; o->out = "out/train_tiny"; o->fp8_block = 128;
    o->steps = 5400; o->seconds = 260; o->batch = 8; o->seq = 128; o->accum = 1; o->lr = 2e-3; o->warmup = 50;
    o->seed = 1; o->threads = 0; o->gamma = 1e-3; o->alpha = 1e-4; o->lambda = 0.3; o->clip = 1.0;
    o->val_every = 100; o->val_batches = 8; o->sample_tokens = 300;
    o->ep = 1;
    o->save_every = 500; o->save_seconds = 120; o->keep = 3; o->skip_z = 8; o->skip_grad_z = 50; o->window = 64; o->max_skips = 20;
    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        char *end = NULL;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) { usage(stdout); exit(0); }
        if (!v) { fprintf(stderr, "train_tiny: %s needs a value (see --help)\n", a); return 0; }
        i++;
#define NUM(flag, field, conv, lo, bit)                                                                       \
    if (strcmp(a, flag) == 0) {                                                                                \
        o->field = conv(v, &end);                                                                              \
        if (!end || *end || !(o->field >= lo)) { fprintf(stderr, "train_tiny: %s wants a number >= %g, got '%s'\n", flag, (double)(lo), v); return 0; } \
        o->given |= bit;                                                                                       \
        continue;                                                                                              \
    }
#define LNG(s, e) strtol(s, e, 10)
#define DBL(s, e) strtod(s, e)
        NUM("--steps", steps, LNG, 1, G_STEPS) NUM("--batch", batch, LNG, 1, G_BATCH) NUM("--seq", seq, LNG, 2, G_SEQ)
        NUM("--threads", threads, LNG, 1, 0) NUM("--accum", accum, LNG, 1, G_ACCUM) NUM("--val-every", val_every, LNG, 1, 0)
        NUM("--sample", sample_tokens, LNG, 0, 0) NUM("--lr", lr, DBL, 0, G_LR) NUM("--gamma", gamma, DBL, 0, G_GAMMA)
        NUM("--alpha", alpha, DBL, 0, G_ALPHA) NUM("--lambda", lambda, DBL, 0, G_LAMBDA) NUM("--clip", clip, DBL, 0, G_CLIP)
        NUM("--seconds", seconds, DBL, 0, 0) NUM("--warmup", warmup, LNG, 0, G_WARMUP) NUM("--fp8-block", fp8_block, LNG, 1, G_FP8_BLOCK)
        NUM("--save-every", save_every, LNG, 0, 0) NUM("--save-every-seconds", save_seconds, DBL, 0, 0) NUM("--keep", keep, LNG, 0, 0) NUM("--zero", zero, LNG, 0, 0) NUM("--ep", ep, LNG, 1, 0)
        NUM("--ep-fp8", ep_fp8, LNG, 0, 0)
        NUM("--skip-loss-z", skip_z, DBL, 0, G_SKIP_Z) NUM("--skip-grad-z", skip_grad_z, DBL, 0, G_SKIP_GRAD_Z) NUM("--skip-window", window, LNG, 2, G_WINDOW) NUM("--max-skips", max_skips, LNG, 1, G_MAX_SKIPS)
        if (strcmp(a, "--seed") == 0) {
            o->seed = strtoull(v, &end, 10);
            if (!end || *end || *v == '-') { fprintf(stderr, "train_tiny: --seed wants a non-negative integer, got '%s'\n", v); return 0; }
            o->given |= G_SEED;
            continue;
        }
        if (strcmp(a, "--config") == 0) { o->config = v; continue; }
        if (strcmp(a, "--device") == 0) { o->device = v; continue; }
        if (strcmp(a, "--data") == 0) { o->data = v; continue; }
        if (strcmp(a, "--out") == 0) { o->out = v; continue; }
        if (strcmp(a, "--resume") == 0) { o->resume = v; continue; }
        if (strcmp(a, "--inject") == 0) {
            if (!parse_inject(v, o)) { fprintf(stderr, "train_tiny: --inject wants KIND@A[-B],... (nan-loss, nan-grad, spike), got '%s'\n", v); return 0; }
            continue;
        }
        if (strcmp(a, "--precision") == 0 || strcmp(a, "--moments") == 0) {
            int moments = a[2] == 'm', k, n = moments ? 2 : 4;
            for (k = 0; k < n && strcmp(v, moments ? moment_types[k] : precisions[k]) != 0; k++) {}
            if (k == n) {
                fprintf(stderr, "train_tiny: %s is %s, got '%s'\n", a, moments ? "fp32 or bf16" : "fp32, bf16, fp8 or fp8-tensor", v);
                return 0;
            }
            if (moments) { o->moments = k; o->given |= G_MOMENTS; }
            else { o->precision = k; o->given |= G_PRECISION; }
            continue;
        }
        fprintf(stderr, "train_tiny: unknown flag '%s' (see --help)\n", a);
        return 0;
    }
    if (o->window > 200) { fprintf(stderr, "train_tiny: --skip-window is at most 200\n"); return 0; }
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

/* After what only rank 0 does to OUT's files (the cleanups, the search for a checkpoint, the
   log, the checkpoints): its status to every rank, so that a failure stops them all (a launcher
   that does not end the others on one rank's exit would leave them waiting). Rank 0 says why
   (why, or the context's error) before the agreement — once another rank has exited, mpirun
   may end it — the others that rank 0 could not <what>; then every rank exits with status 1. */
static void agree_rank0(moe_ctx *ctx, moe_comm *comm, int rank, moe_status s, const char *what, const char *why) {
    int64_t agreed = (int64_t)s;
    if (s != MOE_OK) {
        fprintf(stderr, "\ntrain_tiny: could not %s: %s: %s\n", what, moe_status_name(s), why ? why : moe_ctx_error(ctx));
        fflush(stderr);
    }
    if (moe_comm_bcast(ctx, comm, &agreed, 1, MOE_COMM_I64, 0) != MOE_OK) {
        fprintf(stderr, "\ntrain_tiny: %s\n", moe_ctx_error(ctx));
        exit(1);
    }
    if (agreed != MOE_OK) { /* everyone has said why before any rank exits */
        if (rank != 0) fprintf(stderr, "\ntrain_tiny: rank 0 could not %s: stopping\n", what);
        fflush(stderr);
        moe_comm_barrier(ctx, comm);
        exit(1);
    }
}

/* ---- what the checkpoint keeps for this program (moe_train_state.user) ----
   The settings that decide the weights, then the spike guard: skipped steps in a row, how many
   values the window holds, where the next one goes, the window of losses, the window of
   gradient norms. */
enum {
    U_LAYOUT, U_BATCH, U_SEQ, U_ACCUM, U_LR, U_WARMUP, U_GAMMA, U_ALPHA, U_LAMBDA, U_CLIP, U_PRECISION, U_FP8_BLOCK, U_MOMENTS,
    U_DATA_TOKENS, U_SKIP_Z, U_SKIP_GRAD_Z, U_WINDOW, U_MAX_SKIPS, U_IN_A_ROW, U_COUNT, U_NEXT, U_WIN
};
#define LAYOUT 20261208.0 /* the layout's date: a checkpoint of another program or version has another */

static void settings_store(const options *o, double data_tokens, moe_train_state *st) {
    st->user[U_LAYOUT] = LAYOUT;
    st->user[U_BATCH] = (double)o->batch; st->user[U_SEQ] = (double)o->seq; st->user[U_ACCUM] = (double)o->accum;
    st->user[U_LR] = o->lr; st->user[U_WARMUP] = (double)o->warmup; st->user[U_GAMMA] = o->gamma; st->user[U_ALPHA] = o->alpha;
    st->user[U_LAMBDA] = o->lambda; st->user[U_CLIP] = o->clip; st->user[U_PRECISION] = (double)o->precision;
    st->user[U_FP8_BLOCK] = (double)o->fp8_block; st->user[U_MOMENTS] = (double)o->moments; st->user[U_DATA_TOKENS] = data_tokens;
    st->user[U_SKIP_Z] = o->skip_z; st->user[U_SKIP_GRAD_Z] = o->skip_grad_z; st->user[U_WINDOW] = (double)o->window; st->user[U_MAX_SKIPS] = (double)o->max_skips;
    st->n_user = U_WIN + 2 * o->window;
}

/* Take the checkpoint's settings for the flags not given; name the given ones that differ. */
static int settings_restore(options *o, const moe_train_state *st) {
    int differ = 0;
    if (st->n_user < U_WIN || st->user[U_LAYOUT] != LAYOUT) {
        fprintf(stderr, "train_tiny: the checkpoint holds no train_tiny settings (written by another program or version?): "
                        "the flags of this run apply\n");
        return 0;
    }
#define RESTORE(slot, bit, flag, field, type)                                                                                    \
    if (!(o->given & (bit))) o->field = (type)st->user[slot];                                                                    \
    else if ((double)o->field != st->user[slot]) {                                                                               \
        fprintf(stderr, "train_tiny: %s %g differs from the checkpoint's %g: the run will not match an uninterrupted one\n", flag, \
                (double)o->field, st->user[slot]);                                                                               \
        differ = 1;                                                                                                              \
    }
    RESTORE(U_BATCH, G_BATCH, "--batch", batch, long) RESTORE(U_SEQ, G_SEQ, "--seq", seq, long)
    RESTORE(U_ACCUM, G_ACCUM, "--accum", accum, long) RESTORE(U_LR, G_LR, "--lr", lr, double)
    RESTORE(U_WARMUP, G_WARMUP, "--warmup", warmup, long) RESTORE(U_GAMMA, G_GAMMA, "--gamma", gamma, double)
    RESTORE(U_ALPHA, G_ALPHA, "--alpha", alpha, double) RESTORE(U_LAMBDA, G_LAMBDA, "--lambda", lambda, double)
    RESTORE(U_CLIP, G_CLIP, "--clip", clip, double) RESTORE(U_FP8_BLOCK, G_FP8_BLOCK, "--fp8-block", fp8_block, long)
    RESTORE(U_SKIP_Z, G_SKIP_Z, "--skip-loss-z", skip_z, double) RESTORE(U_SKIP_GRAD_Z, G_SKIP_GRAD_Z, "--skip-grad-z", skip_grad_z, double) RESTORE(U_MAX_SKIPS, G_MAX_SKIPS, "--max-skips", max_skips, long)
    if (!(st->user[U_PRECISION] >= 0 && st->user[U_PRECISION] <= 3) || !(st->user[U_MOMENTS] >= 0 && st->user[U_MOMENTS] <= 1) ||
        !(st->user[U_WINDOW] >= 2 && st->user[U_WINDOW] <= 200) || st->n_user != U_WIN + 2 * (long)st->user[U_WINDOW]) {
        fprintf(stderr, "train_tiny: the checkpoint's settings are out of range\n");
        return -1;
    }
    if (!(o->given & G_PRECISION)) o->precision = (long)st->user[U_PRECISION];
    else if ((double)o->precision != st->user[U_PRECISION])
        differ = fprintf(stderr, "train_tiny: --precision %s differs from the checkpoint's %s: the run will not match an uninterrupted one\n",
                         precisions[o->precision], precisions[(int)st->user[U_PRECISION]]) > 0;
    if ((o->given & G_MOMENTS) && (double)o->moments != st->user[U_MOMENTS])
        fprintf(stderr, "train_tiny: --moments cannot change on a resume: keeping the checkpoint's %s\n", moment_types[(int)st->user[U_MOMENTS]]);
    o->moments = (long)st->user[U_MOMENTS];
    if ((o->given & G_WINDOW) && (double)o->window != st->user[U_WINDOW])
        fprintf(stderr, "train_tiny: --skip-window cannot change on a resume: keeping the checkpoint's %g\n", st->user[U_WINDOW]);
    o->window = (long)st->user[U_WINDOW];
    return differ;
}

/* ---- the spike guard (llm.c's outlier detector, kept in the train state) ---- */

/* How far x lies above the mean of the window, in its standard deviations (NAN until the
   window is full, 0 when it has no spread). */
static double zscore(const double *w, long n, long count, double x) {
    double mean = 0, var = 0;
    long i;
    if (count < n) return NAN;
    for (i = 0; i < n; i++) mean += w[i];
    mean /= (double)n;
    for (i = 0; i < n; i++) var += (w[i] - mean) * (w[i] - mean);
    var /= (double)n;
    return var > 0 ? (x - mean) / sqrt(var) : 0;
}
/* A step that was taken adds its loss and gradient norm to the windows (skipped ones do not:
   an outlier must not widen the band that judges the next steps). */
static void guard_push(moe_train_state *st, long window, double loss, double gn) {
    long next = (long)st->user[U_NEXT];
    st->user[U_WIN + next] = loss;
    st->user[U_WIN + window + next] = gn;
    st->user[U_NEXT] = (double)((next + 1) % window);
    if (st->user[U_COUNT] < (double)window) st->user[U_COUNT] += 1;
    st->user[U_IN_A_ROW] = 0;
}

static int injected(const options *o, int kind, long attempt) {
    int i;
    for (i = 0; i < o->n_inject; i++)
        if (o->inject[i].kind == kind && attempt >= o->inject[i].from && attempt <= o->inject[i].to) return 1;
    return 0;
}

/* ---- log.csv ---- */

static const char *const log_header =
    "step,lr,loss,main_loss,mtp_loss,val_loss,grad_norm,max_vio,tokens_per_s,skipped,z_loss,z_grad\n";

/* Keep the header and the first `rows` complete rows (one per attempted step: as many as the
   checkpoint has seen); later rows and a torn last line go. Written atomically. Returns the rows
   kept, or -1 when there is no usable file. */
static long log_truncate(const char *path, long rows) {
    FILE *f = fopen(path, "rb");
    char tmp[1200], *buf;
    long len, i, lines = 0, end = 0;
    if (!f) return -1;
    if (fseek(f, 0, SEEK_END) != 0 || (len = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0 || !(buf = (char *)malloc((size_t)len + 1))) {
        fclose(f);
        return -1;
    }
    if (fread(buf, 1, (size_t)len, f) != (size_t)len) len = 0;
    fclose(f);
    for (i = 0; i < len && lines <= rows; i++)
        if (buf[i] == '\n') { lines++; end = i + 1; }
    snprintf(tmp, sizeof tmp, "%s.tmp%ld", path, (long)getpid());
    f = lines ? fopen(tmp, "wb") : NULL;
    if (!f || fwrite(buf, 1, (size_t)end, f) != (size_t)end || fclose(f) != 0 || rename(tmp, path) != 0) {
        if (f) remove(tmp);
        free(buf);
        return -1;
    }
    free(buf);
    return lines - 1;
}

/* ---- checkpoints ---- */

typedef struct run {
    moe_ctx *ctx;
    const options *o;
    moe_model *m;
    moe_adamw *opt;
    moe_train_state *st;
    FILE *csv;
    moe_comm *comm;
    int rank;            /* only rank 0 writes checkpoints (ZeRO-1: all take part, rank 0 writes) */
    long saved_attempts; /* st->step + st->skipped at the last save (-1: none) */
    double saved_at;     /* moe_time_s() of the last save */
    char path[1100];     /* the last checkpoint written */
} run;

/* OUT/ckpt-<step>.bin (the log first, so that it never has fewer rows than a checkpoint has
   seen), the older ones beyond --keep removed, and OUT/ckpt.bin made a link to it. */
static moe_status save_files(run *r) {
    char link_tmp[1100], latest[1100];
    moe_status s;
    int64_t linked = 1;
    if (r->csv) fflush(r->csv);
    s = moe_ckpt_save_step(r->ctx, r->o->out, "ckpt", (int)r->o->keep, r->m, r->opt, r->st, r->path, sizeof r->path);
    if (s != MOE_OK) return s;
    snprintf(latest, sizeof latest, "%s/ckpt.bin", r->o->out);
    if (r->rank == 0) {
        snprintf(link_tmp, sizeof link_tmp, "%s/ckpt.bin.tmp%ld", r->o->out, (long)getpid());
        remove(link_tmp);
        linked = link(r->path, link_tmp) == 0 && rename(link_tmp, latest) == 0;
        if (!linked) remove(link_tmp);
    }
    if (r->o->zero && (s = moe_comm_bcast(r->ctx, r->comm, &linked, 1, MOE_COMM_I64, 0)) != MOE_OK) return s;
    return linked ? MOE_OK : moe_ckpt_save(r->ctx, latest, r->m, r->opt, r->st); /* no hard links here: a copy */
}

/* A checkpoint, on every rank at the same step (the ranks decide on saves together). Rank 0
   writes the files (ZeRO-1: all ranks take part, the save agrees its status itself, and a
   failure comes back); its status then goes to every rank (agree_rank0: a failed write stops
   all of them with an error, not only rank 0). */
static moe_status save(run *r) {
    moe_status s = MOE_OK;
    char what[64];
    r->saved_attempts = (long)(r->st->step + r->st->skipped);
    r->saved_at = moe_time_s();
    if (r->rank == 0 || r->o->zero) s = save_files(r);
    if (r->o->zero) return s;
    snprintf(what, sizeof what, "write the checkpoint of step %lld", (long long)r->st->step);
    agree_rank0(r->ctx, r->comm, r->rank, s, what, NULL);
    return MOE_OK;
}

/* The end of the ranks' work together: the optimizer (ZeRO-1 keeps the communicator) goes,
   the model runs alone again, the groups are freed. */
static void end_parallel(moe_ctx *ctx, moe_model *m, moe_adamw **opt, moe_comm *ep, moe_comm *edp, moe_comm *world) {
    moe_adamw_free(ctx, *opt);
    *opt = NULL;
    if (ep) moe_model_expert_parallel(ctx, m, NULL, NULL);
    moe_comm_free(edp);
    moe_comm_free(ep);
    moe_comm_free(world);
}

static volatile sig_atomic_t g_signal;
static void on_signal(int sig) { g_signal = sig; }

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
    return bytes > 0 && n > 0 ? 8.0 * (double)bytes / (double)n : -1;
}

/* Greedy-ish sampling (temperature 0.8) from a prompt, full forward per token. */
static moe_status sample(moe_ctx *ctx, moe_model *m, const char *prompt, long n, unsigned long long seed, char *out) {
    int32_t toks[4096];
    long len = (long)strlen(prompt), i, ctxlen = moe_model_config(m)->max_position_embeddings;
    moe_rng rng = moe_rng_new(seed, 99);
    moe_status s = MOE_OK;
    float *all = NULL; /* the logits on the host */
    for (i = 0; i < len; i++) toks[i] = (unsigned char)prompt[i];
    moe_ctx_set_grad_enabled(ctx, 0);
    for (i = 0; i < n && s == MOE_OK && len < 4096; i++) {
        long start = len > ctxlen ? len - ctxlen : 0, T = len - start, v, V = moe_model_config(m)->vocab_size;
        moe_tensor *logits;
        double mx = -1e30, z = 0, u, acc = 0;
        float *row;
        s = moe_model_logits(ctx, m, toks + start, 1, T, &logits);
        if (s != MOE_OK) break;
        if (!(all = (float *)realloc(all, (size_t)(T * V) * sizeof(float)))) { s = MOE_ERR_MEMORY; break; }
        if ((s = moe_tensor_download(ctx, logits, all, (size_t)(T * V) * sizeof(float))) != MOE_OK) break; /* from any device */
        row = all + (T - 1) * V;
        for (v = 0; v < V; v++) mx = row[v] > mx ? row[v] : mx;
        for (v = 0; v < V; v++) z += exp((row[v] - mx) / 0.8);
        u = moe_rng_uniform(&rng) * z;
        for (v = 0; v < V - 1; v++) {
            acc += exp((row[v] - mx) / 0.8);
            if (acc >= u) break;
        }
        toks[len++] = (int32_t)v;
        out[i] = (char)(v >= 32 && v < 127 ? v : v == '\n' ? '\n' : '?');
        moe_ctx_reset(ctx);
    }
    out[i] = 0;
    free(all);
    moe_ctx_set_grad_enabled(ctx, 1);
    moe_model_reset_loads(m);
    return s;
}

/* A number for the JSON line, or null when it is not finite. */
static const char *json_num(char *buf, size_t cap, double v) {
    if (isfinite(v)) snprintf(buf, cap, "%.4f", v);
    else snprintf(buf, cap, "null");
    return buf;
}

/* The model without --config: reference §12.1's tiny config, twice its FFN widths (the dense
   layer's 128 -> 256, each expert's 32 -> 64) and 128 positions for --seq 128. */
static moe_config default_config(void) {
    moe_config c = moe_config_tiny();
    c.intermediate_size *= 2;
    c.moe_intermediate_size *= 2;
    c.max_position_embeddings = 128;
    return c;
}

int main(int argc, char **argv) {
    options o;
    moe_ctx *ctx = NULL;
    moe_config cfg = default_config();
    moe_model *m = NULL;
    moe_adamw *opt = NULL;
    moe_dataset *data = NULL;
    moe_adamw_config ac;
    moe_lr_schedule sched;
    moe_loss_opts lo;
    moe_train_state *st;
    run r;
    struct sigaction sa;
    int32_t *batch;
    char path[1100], resume_path[1100], text[4096], reason[600] = "", num[3][32];
    FILE *csv;
    double t0 = moe_time_s(), vl = -1, last_vio = NAN, train_s = 0, final_bpb = NAN, xz_bpb, ema = 0;
    long start_step, run_attempts = 0, logged;
    int64_t total = 0, active = 0, mtp = 0;
    int tty = isatty(2), removed = 0, val_warned = 0, status = 0, rank, ranks;
    long local, stop_now = 0;
    int signal_now = 0;
    moe_comm *comm = NULL, *ep_comm = NULL, *edp_comm = NULL;

    if (!parse_args(argc, argv, &o)) return 2;
    if (moe_ctx_new(&ctx) != MOE_OK) return 1;
    st = (moe_train_state *)calloc(1, sizeof *st);
    if (!st) return 1;
    CHECK(moe_comm_init(ctx, MOE_COMM_DEFAULT, &comm)); /* MPI when built with MOE_MPI */
    rank = moe_comm_rank(comm);
    ranks = moe_comm_size(comm);
    if (o.threads) CHECK(moe_ctx_set_threads(ctx, (int)o.threads));
    if (o.device) CHECK(moe_ctx_set_device_name(ctx, o.device));
    if (o.n_inject && moe_ctx_device(ctx) != MOE_DEVICE_CPU) {
        fprintf(stderr, "train_tiny: --inject writes single values of host tensors: use it on the CPU\n");
        return 2;
    }
    make_dirs(o.out);
    if (rank != 0) { /* one voice: the others' messages go to OUT/rank-<r>.log */
        snprintf(path, sizeof path, "%s/rank-%d.log", o.out, rank);
        if (!freopen(path, "w", stderr) || !freopen("/dev/null", "w", stdout)) return 1;
        tty = 0;
    }
    resume_path[0] = 0;
    /* the files are rank 0's: it cleans up (temporaries of a process killed while writing a
       checkpoint or the log) and finds the checkpoint to resume, each step agreed with the
       others (agree_rank0), then tells them which */
    agree_rank0(ctx, comm, rank, rank == 0 ? moe_ckpt_clean(ctx, o.out, NULL, -1, &removed) : MOE_OK,
                "remove a killed run's temporaries", NULL);
    if (removed) fprintf(stderr, "removed %d temporary file%s left in %s by a killed run\n", removed, removed > 1 ? "s" : "", o.out);
    if (o.resume && strcmp(o.resume, "auto") == 0) {
        agree_rank0(ctx, comm, rank, rank == 0 ? moe_ckpt_latest(ctx, o.out, "ckpt", resume_path, sizeof resume_path) : MOE_OK,
                    "look for the newest checkpoint", NULL);
        if (rank == 0 && !resume_path[0]) fprintf(stderr, "--resume auto: no checkpoint in %s, starting at step 0\n", o.out);
    } else if (o.resume && rank == 0) {
        snprintf(resume_path, sizeof resume_path, "%s", o.resume);
    }
    CHECK(moe_comm_bcast(ctx, comm, resume_path, (int64_t)sizeof resume_path, MOE_COMM_BYTE, 0));
    if (o.config) CHECK(moe_config_load(ctx, o.config, &cfg));
    if (resume_path[0]) CHECK(moe_ckpt_config(ctx, resume_path, &cfg));
    CHECK(moe_comm_check_config(ctx, comm, &cfg));
    CHECK(moe_model_new(ctx, &cfg, o.seed, &m));
    if (resume_path[0]) { /* weights and state first: the settings decide the optimizer's moments */
        CHECK(moe_ckpt_load(ctx, resume_path, m, NULL, st));
        if (settings_restore(&o, st) < 0) return 1;
        if ((o.given & G_SEED) && o.seed != st->seed)
            fprintf(stderr, "train_tiny: --seed %llu differs from the checkpoint's %llu: its data order is kept\n", o.seed,
                    (unsigned long long)st->seed);
        o.seed = st->seed;
        if (!(o.given & G_STEPS) && st->total_steps > 0) o.steps = (long)st->total_steps;
    }
    if (o.accum % ranks != 0) { /* every rank finds it: they end together */
        fprintf(stderr, "train_tiny: --accum %ld micro-batches do not split over %d ranks (make it a multiple)\n", o.accum, ranks);
        moe_comm_free(comm);
        return 2;
    }
    local = o.accum / ranks; /* this rank's micro-batches of a step: [rank·local, (rank + 1)·local) */
    if (o.ep_fp8 && (o.ep < 2 || strcmp(precisions[o.precision], "fp8") != 0)) {
        fprintf(stderr, "train_tiny: --ep-fp8 wants --ep N (N > 1) and --precision fp8\n");
        moe_comm_free(comm);
        return 2;
    }
    if (ranks % o.ep != 0) {
        fprintf(stderr, "train_tiny: --ep %ld does not divide the %d ranks\n", o.ep, ranks);
        moe_comm_free(comm);
        return 2;
    }
    if (o.zero > 1) {
        fprintf(stderr, "train_tiny: --zero %ld: only ZeRO stage 1 (sharded optimizer state) is implemented\n", o.zero);
        moe_comm_free(comm);
        return 2;
    }
    if (o.seq > cfg.max_position_embeddings) {
        fprintf(stderr, "train_tiny: --seq %ld exceeds max_position_embeddings %lld\n", o.seq, (long long)cfg.max_position_embeddings);
        moe_comm_free(comm);
        return 2;
    }
    if (o.precision >= 2) {
        moe_fp8_options f8;
        memset(&f8, 0, sizeof f8);
        f8.block = o.fp8_block;
        f8.per_tensor = o.precision == 3;
        CHECK(moe_ctx_set_fp8(ctx, &f8));
        CHECK(moe_ctx_set_gemm_precision(ctx, MOE_FP8_E4M3));
    } else {
        CHECK(moe_ctx_set_gemm_precision(ctx, o.precision == 1 ? MOE_BF16 : MOE_F32));
    }
    CHECK(moe_data_load(ctx, o.data, 0.1, &data));
    if (data->vocab > cfg.vocab_size) {
        fprintf(stderr, "train_tiny: the data has tokens up to %lld but vocab_size is %lld\n", (long long)data->vocab - 1, (long long)cfg.vocab_size);
        moe_comm_free(comm);
        return 2;
    }
    memset(&ac, 0, sizeof ac);
    ac.moment_dtype = o.moments == 1 ? MOE_BF16 : MOE_F32;
    CHECK(moe_adamw_new(ctx, m, &ac, &opt));
    if (resume_path[0]) {
        if (st->n_user >= U_WIN && st->user[U_LAYOUT] == LAYOUT && st->user[U_DATA_TOKENS] != (double)data->n_tokens)
            fprintf(stderr, "train_tiny: %s has %lld tokens, the checkpoint's data had %.0f: the run will not match an uninterrupted one\n",
                    o.data, (long long)data->n_tokens, st->user[U_DATA_TOKENS]);
        CHECK(moe_ckpt_load(ctx, resume_path, m, opt, st));
        if (st->n_user != U_WIN + 2 * o.window || st->user[U_LAYOUT] != LAYOUT) /* no settings of ours: a fresh guard */
            memset(st->user, 0, sizeof st->user);
        settings_store(&o, (double)data->n_tokens, st); /* the settings this run trains with, for the next resume */
        fprintf(stderr, "resumed from %s at step %lld of %ld (%lld skipped so far)\n", resume_path, (long long)st->step, o.steps,
                (long long)st->skipped);
        /* checkpoints after this one (corrupt, or of a run continued from an older one) would mislead --resume auto */
        agree_rank0(ctx, comm, rank, rank == 0 ? moe_ckpt_clean(ctx, o.out, "ckpt", st->step, &removed) : MOE_OK,
                    "remove the checkpoints after the one resumed", NULL);
        if (removed) fprintf(stderr, "removed %d checkpoint%s after step %lld from %s\n", removed, removed > 1 ? "s" : "", (long long)st->step, o.out);
    } else {
        st->seed = o.seed;
        settings_store(&o, (double)data->n_tokens, st);
        agree_rank0(ctx, comm, rank, rank == 0 ? moe_ckpt_clean(ctx, o.out, "ckpt", -1, &removed) : MOE_OK,
                    "remove an earlier run's checkpoints", NULL);
        if (removed)
            fprintf(stderr, "a fresh run: removed %d checkpoint%s of an earlier run from %s (--resume auto continues a run)\n", removed,
                    removed > 1 ? "s" : "", o.out);
    }
    st->total_steps = o.steps;
    start_step = (long)st->step;
    if (o.zero) { /* after the load: each rank keeps its shard of the moments it read */
        size_t whole = moe_adamw_state_bytes(opt);
        CHECK(moe_adamw_shard(ctx, opt, comm));
        fprintf(stderr, "ZeRO-1: AdamW moments %.2f MiB on this rank (%.2f MiB unsharded), over %d ranks\n",
                (double)moe_adamw_state_bytes(opt) / 1048576.0, (double)whole / 1048576.0, ranks);
    }
    if (o.ep > 1) { /* EP groups of consecutive ranks; EDP groups: the same place in each */
        CHECK(moe_comm_split(ctx, comm, rank / (int)o.ep, rank, &ep_comm));
        CHECK(moe_comm_split(ctx, comm, rank % (int)o.ep, rank, &edp_comm));
        CHECK(moe_model_expert_parallel(ctx, m, ep_comm, ranks > o.ep ? edp_comm : NULL));
        if (o.ep_fp8) CHECK(moe_model_expert_parallel_payload(ctx, m, MOE_FP8_E4M3, MOE_BF16));
        fprintf(stderr, "expert parallel: %d group%s of %ld ranks, %lld routed experts per rank\n", ranks / (int)o.ep,
                ranks / (int)o.ep > 1 ? "s" : "", o.ep, (long long)(cfg.n_routed_experts / o.ep));
    }

    /* the log: as many rows as the checkpoint has seen attempts, then this run's */
    snprintf(path, sizeof path, "%s/log.csv", o.out);
    if (rank != 0) snprintf(path, sizeof path, "/dev/null");
    logged = resume_path[0] && rank == 0 ? log_truncate(path, (long)(st->step + st->skipped)) : -1;
    if (resume_path[0] && logged >= 0 && logged < (long)(st->step + st->skipped))
        fprintf(stderr, "note: %s has %ld rows, the checkpoint has seen %lld steps\n", path, logged, (long long)(st->step + st->skipped));
    csv = fopen(path, logged >= 0 ? "a" : "w"); /* the others': /dev/null */
    snprintf(reason, sizeof reason, "%s", csv ? "" : strerror(errno));
    snprintf(text, sizeof text, "write %s/log.csv", o.out);
    agree_rank0(ctx, comm, rank, rank == 0 && !csv ? MOE_ERR_IO : MOE_OK, text, reason);
    if (!csv) { fprintf(stderr, "train_tiny: cannot write %s: %s\n", path, reason); return 1; } /* another rank's /dev/null */
    if (logged < 0) fputs(log_header, csv);

    memset(&sched, 0, sizeof sched);
    sched.shape = MOE_LR_COSINE; sched.lr_max = (float)o.lr; sched.lr_min = (float)o.lr / 10;
    sched.warmup_steps = o.warmup; sched.total_steps = o.steps;
    lo.mtp_lambda = (float)o.lambda;
    lo.balance_alpha = (float)o.alpha;
    batch = (int32_t *)malloc(sizeof(int32_t) * (size_t)(o.batch * (o.seq + 1)));
    moe_model_param_counts(m, &total, &active, &mtp);
    fprintf(stderr, "model: %lld parameters (%lld active per token) + %lld in MTP; data: %s, %lld train / %lld validation tokens\n",
            (long long)total, (long long)active, (long long)mtp, o.data, (long long)data->n_train, (long long)(data->n_tokens - data->n_train));
    fprintf(stderr, "training: %ld steps of %ld x %ld x %ld tokens, %s, %d threads%s\n", o.steps, o.accum, o.batch, o.seq,
            precisions[o.precision], moe_ctx_threads(ctx), ranks > 1 ? " per rank" : "");
    if (ranks > 1) fprintf(stderr, "data parallel: %d ranks, %ld micro-batches each per step\n", ranks, local);

    memset(&r, 0, sizeof r);
    r.ctx = ctx; r.o = &o; r.m = m; r.opt = opt; r.st = st; r.csv = csv; r.comm = comm; r.rank = rank;
    r.saved_attempts = resume_path[0] ? (long)(st->step + st->skipped) : -1;
    snprintf(r.path, sizeof r.path, "%s", resume_path);
    r.saved_at = moe_time_s();
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sa.sa_flags = SA_RESTART | SA_RESETHAND; /* a second signal ends the process at once */
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);

    while (st->step < o.steps) {
        long attempt = (long)(st->step + st->skipped) + 1, a, first = (long)st->data_index;
        double ts = moe_time_s(), loss_sum = 0, main_sum = 0, mtp_sum = 0, tps, eta, zl = NAN, zg = NAN, loss;
        float gn = NAN, lr = moe_lr_at(&sched, st->step);
        int skip = 0;
        for (a = 0; a < local; a++) {
            moe_tensor *lt;
            moe_loss_parts parts;
            moe_tensor *emb = NULL;
            float keep = 0;
            CHECK(moe_data_batch(ctx, data, 0, st->seed, first + rank * local + a, o.batch, o.seq, batch));
            if (a == 0 && rank == 0 && injected(&o, INJECT_NAN_LOSS, attempt)) { /* a NaN in one embedding during this forward only */
                emb = moe_model_find(m, "model.embed_tokens.weight");
                keep = (float)moe_tensor_get(emb, (int64_t)batch[0] * cfg.hidden_size);
                moe_tensor_set(emb, (int64_t)batch[0] * cfg.hidden_size, NAN);
            }
            CHECK(moe_model_loss(ctx, m, batch, o.batch, o.seq, &lo, &lt, &parts));
            if (emb) moe_tensor_set(emb, (int64_t)batch[0] * cfg.hidden_size, keep);
            if (ep_comm) { /* expert parallel: backward is a collective, so the ranks skip it together */
                int64_t bad = !isfinite(parts.total);
                CHECK(moe_comm_allreduce(ctx, comm, &bad, 1, MOE_COMM_I64, MOE_COMM_MAX));
                if (bad && isfinite(parts.total)) {
                    moe_ctx_reset(ctx);
                    skip = 1;
                    snprintf(reason, sizeof reason, "another rank's loss is not finite");
                    loss_sum = main_sum = mtp_sum = NAN;
                    break;
                }
            }
            if (!isfinite(parts.total)) { /* no backward through a non-finite loss */
                moe_ctx_reset(ctx);
                skip = 1;
                snprintf(reason, sizeof reason, "loss is %g", parts.total);
                loss_sum = main_sum = mtp_sum = parts.total * (double)o.accum; /* logged as it is */
                break;
            }
            CHECK(moe_backward(ctx, lt));
            moe_ctx_reset(ctx);
            if (local > 1) CHECK(moe_model_accumulate_grads(ctx, m)); /* the micro-batch's gradient, then added */
            loss_sum += parts.total;
            main_sum += parts.main;
            mtp_sum += parts.mtp[0];
        }
        {   /* every rank's losses in rank order, and one decision to skip */
            double sums[3];
            int64_t any_skip = skip;
            sums[0] = loss_sum; sums[1] = main_sum; sums[2] = mtp_sum;
            CHECK(moe_comm_allreduce_ordered(ctx, comm, sums, 3, MOE_COMM_F64));
            CHECK(moe_comm_allreduce(ctx, comm, &any_skip, 1, MOE_COMM_I64, MOE_COMM_MAX));
            loss_sum = sums[0]; main_sum = sums[1]; mtp_sum = sums[2];
            if (any_skip && !skip) snprintf(reason, sizeof reason, "another rank's loss is not finite");
            skip = (int)any_skip;
        }
        if (!skip) CHECK(moe_model_reduce_grads(ctx, m, comm)); /* the step's gradient: every micro-batch's, summed */
        st->data_index = first + o.accum; /* a skipped step's batches are consumed too */
        loss = loss_sum / (double)o.accum;
        if (!skip) {
            if (injected(&o, INJECT_NAN_GRAD, attempt) || injected(&o, INJECT_SPIKE, attempt)) {
                int64_t i, j;
                for (i = 0; i < moe_model_tensor_count(m); i++) {
                    int is_param = 0;
                    moe_tensor *t = moe_model_tensor(m, i, NULL, &is_param);
                    if (!is_param || !t->grad) continue;
                    if (injected(&o, INJECT_NAN_GRAD, attempt)) { moe_tensor_set(t->grad, 0, NAN); break; }
                    for (j = 0; j < t->grad->numel; j++) moe_tensor_set(t->grad, j, 1000.0 * moe_tensor_get(t->grad, j));
                }
            }
            CHECK(moe_adamw_grad_norm(ctx, opt, 1.0f / (float)o.accum, &gn));
            zl = zscore(st->user + U_WIN, o.window, (long)st->user[U_COUNT], loss);
            zg = zscore(st->user + U_WIN + o.window, o.window, (long)st->user[U_COUNT], gn);
            if (!isfinite(gn)) {
                skip = 1;
                snprintf(reason, sizeof reason, "gradient norm is %g", (double)gn);
            } else if (o.skip_z > 0 && zl > o.skip_z) {
                skip = 1;
                snprintf(reason, sizeof reason, "loss %.4f is %.1f standard deviations above the last %ld steps' mean", loss, zl, o.window);
            } else if (o.skip_grad_z > 0 && zg > o.skip_grad_z) {
                skip = 1;
                snprintf(reason, sizeof reason, "gradient norm %.4g is %.1f standard deviations above the last %ld steps' mean", (double)gn, zg,
                         o.window);
            }
        }
        if (skip) { /* nothing changes but the data position and the counts */
            moe_model_zero_grad(m);
            moe_model_reset_loads(m);
            st->skipped++;
            st->user[U_IN_A_ROW] += 1;
            fprintf(stderr, "%sstep %lld skipped: %s (%.0f in a row, %lld in all)\n", tty ? "\n" : "", (long long)st->step + 1, reason,
                    st->user[U_IN_A_ROW], (long long)st->skipped);
        } else {
            CHECK(moe_adamw_step(ctx, opt, lr, 1.0f / (float)o.accum, (float)o.clip, &gn));
            last_vio = moe_model_max_vio(m);
            CHECK(moe_model_update_expert_bias(ctx, m, (float)o.gamma));
            guard_push(st, o.window, loss, gn);
            st->step++;
            st->tokens_seen += (double)(o.accum * o.batch * o.seq);
            ema = ema == 0 ? main_sum / (double)o.accum : 0.95 * ema + 0.05 * main_sum / (double)o.accum;
        }
        train_s += moe_time_s() - ts;
        run_attempts++;
        if (!skip && (st->step % o.val_every == 0 || st->step == o.steps)) {
            moe_status vs = val_loss(ctx, m, data, 0, o.val_batches, o.batch, o.seq, batch, &vl);
            if (vs != MOE_OK) { /* e.g. a validation text shorter than one sequence: train on without */
                if (!val_warned) fprintf(stderr, "%svalidation estimate skipped: %s\n", tty ? "\n" : "", moe_ctx_error(ctx));
                val_warned = 1;
                vl = NAN;
            }
        }
        tps = (double)(o.accum * o.batch * o.seq) * (double)run_attempts / (train_s > 0 ? train_s : 1); /* this run's steps only */
        eta = (double)(o.steps - st->step) * train_s / (double)run_attempts;
        if (o.seconds > 0 && eta > o.seconds - train_s) eta = o.seconds - train_s;
        fprintf(csv, "%lld,%.6g,%.6f,%.6f,%.6f,%.6f,%.4f,%.4f,%.0f,%d,", (long long)st->step + skip, (double)lr, loss,
                main_sum / (double)o.accum, mtp_sum / (double)o.accum, vl, (double)gn, last_vio, tps, skip);
        if (isfinite(zl)) fprintf(csv, "%.3f", zl);
        fputc(',', csv);
        if (isfinite(zg)) fprintf(csv, "%.3f", zg);
        fputc('\n', csv);
        if (tty || (!skip && (st->step % o.val_every == 0 || st->step == o.steps))) {
            int bar = (int)(30 * st->step / o.steps), i;
            char bars[31];
            for (i = 0; i < 30; i++) bars[i] = i < bar ? '#' : '.';
            bars[30] = 0;
            fprintf(stderr, "%s[%s] step %5lld/%ld  loss %.3f  val %.3f  %6.0f tok/s  ETA %4.0fs  MaxVio %.2f%s", tty ? "\r" : "",
                    bars, (long long)st->step, o.steps, ema, vl, tps, eta > 0 ? eta : 0, last_vio, tty ? "  " : "\n");
        }
        if (skip && st->user[U_IN_A_ROW] >= (double)o.max_skips) {
            CHECK(save(&r));
            fprintf(stderr, "%strain_tiny: %ld steps in a row skipped (the last: %s): stopping. The last good state is in %s "
                            "(step %lld); lower --lr, raise --skip-loss-z / --skip-grad-z or check the data, then --resume auto\n",
                    tty ? "\n" : "", o.max_skips, reason, r.path, (long long)st->step);
            fclose(csv);
            end_parallel(ctx, m, &opt, ep_comm, edp_comm, comm);
            return 3;
        }
        {   /* a signal, the time budget or a save that is due on any rank: every rank acts
               after the same step (a signal that arrives after this rank sent its flag counts
               at the next step) */
            int64_t stop[3];
            stop[0] = g_signal;
            stop[1] = o.seconds > 0 && train_s >= o.seconds;
            stop[2] = o.save_seconds > 0 && moe_time_s() - r.saved_at >= o.save_seconds;
            CHECK(moe_comm_allreduce(ctx, comm, stop, 3, MOE_COMM_I64, MOE_COMM_MAX));
            signal_now = (int)stop[0];
            stop_now = stop[1];
            if (st->step < o.steps && ((!skip && o.save_every > 0 && st->step % o.save_every == 0) || stop[2])) CHECK(save(&r));
        }
        if (signal_now) {
            CHECK(save(&r));
            fprintf(stderr, "%sinterrupted by %s after step %lld: saved %s; continue with --resume auto (exit status 75)\n", tty ? "\n" : "",
                    signal_now == SIGINT ? "SIGINT" : "SIGTERM", (long long)st->step, r.path);
            fclose(csv);
            end_parallel(ctx, m, &opt, ep_comm, edp_comm, comm);
            return 75;
        }
        if (stop_now) break;
    }
    if (tty) fprintf(stderr, "\n");
    if (r.saved_attempts != (long)(st->step + st->skipped)) CHECK(save(&r));
    fclose(csv);
    r.csv = NULL;
    end_parallel(ctx, m, &opt, ep_comm, edp_comm, comm); /* the rest is rank 0's alone */
    if (rank != 0) goto done;
    {   /* the Hugging Face export of the same step, OUT/hf-<step>/, and OUT/hf linked to it */
        char hf[1100], name[64], link_tmp[1100], link_path[1100];
        struct stat sb;
        snprintf(name, sizeof name, "hf-%08lld", (long long)st->step);
        snprintf(hf, sizeof hf, "%s/%s", o.out, name);
        make_dirs(hf);
        CHECK(moe_ckpt_clean(ctx, hf, NULL, -1, NULL));
        CHECK(moe_model_save_hf(ctx, m, hf, NULL)); /* config.json + model.safetensors for transformers */
        snprintf(link_path, sizeof link_path, "%s/hf", o.out);
        snprintf(link_tmp, sizeof link_tmp, "%s/hf.tmp%ld", o.out, (long)getpid());
        remove(link_tmp);
        if (lstat(link_path, &sb) == 0 && !S_ISLNK(sb.st_mode))
            fprintf(stderr, "note: %s is a directory of an earlier version, left as it is; the export is %s\n", link_path, hf);
        else if (symlink(name, link_tmp) != 0 || rename(link_tmp, link_path) != 0)
            remove(link_tmp);
        snprintf(path, sizeof path, "%s", hf);
    }
    signal(SIGINT, SIG_DFL); /* everything is saved: the evaluation below may be cut short */
    signal(SIGTERM, SIG_DFL);
    if (g_signal) {
        fprintf(stderr, "interrupted by %s after step %lld: saved %s and %s (exit status 75)\n", g_signal == SIGINT ? "SIGINT" : "SIGTERM",
                (long long)st->step, r.path, path);
        return 75;
    }

    /* the whole validation text, window by window */
    {
        long windows = (long)((data->n_tokens - data->n_train - 1) / o.seq), B = windows < o.batch ? windows : o.batch;
        if (B < 1) {
            snprintf(reason, sizeof reason, "the validation text (%lld tokens) is shorter than --seq + 1 = %ld",
                     (long long)(data->n_tokens - data->n_train), o.seq + 1);
        } else if (val_loss(ctx, m, data, 0, windows / B, B, o.seq, batch, &vl) != MOE_OK) {
            snprintf(reason, sizeof reason, "%s", moe_ctx_error(ctx));
        } else if (!isfinite(vl)) {
            snprintf(reason, sizeof reason, "the validation loss is %g", vl);
        } else {
            final_bpb = vl / log(2.0);
            reason[0] = 0;
        }
        if (reason[0]) fprintf(stderr, "no final validation: %s\n", reason);
    }
    xz_bpb = xz_bits_per_byte(data, o.out);
    if (o.sample_tokens > 0) {
        if (sample(ctx, m, "It is a truth universally acknowledged, ", o.sample_tokens > 4000 ? 4000 : o.sample_tokens, o.seed, text) == MOE_OK)
            printf("\n--- sample ---\nIt is a truth universally acknowledged, %s\n--------------\n", text);
        else
            fprintf(stderr, "no sample: %s\n", moe_ctx_error(ctx));
    }
    printf("trained %lld steps (%.0f tokens, %lld skipped%s) in %.1f s; checkpoint %s, Hugging Face export %s\n", (long long)st->step,
           st->tokens_seen, (long long)st->skipped, start_step ? ", resumed" : "", moe_time_s() - t0, r.path, path);
    printf("validation: %.4f bits per byte (model)  vs  %.4f (xz -9e) on the same %lld bytes; MaxVio %.3f\n", final_bpb, xz_bpb,
           (long long)(data->n_tokens - data->n_train), last_vio);
    printf("{\"job\":\"train_tiny\",\"steps\":%lld,\"seconds\":%.1f,\"val_bpb\":%s,", (long long)st->step, moe_time_s() - t0,
           json_num(num[0], sizeof num[0], final_bpb));
    if (!isfinite(final_bpb)) {
        char *c;
        for (c = reason; *c; c++)
            if (*c == '"' || *c == '\\' || (unsigned char)*c < 32) *c = '\'';
        printf("\"val_bpb_reason\":\"%s\",", reason);
    }
    printf("\"xz_bpb\":%s,\"max_vio\":%s,\"skipped\":%lld,\"resumed_from\":%ld}\n", json_num(num[1], sizeof num[1], xz_bpb > 0 ? xz_bpb : NAN),
           json_num(num[2], sizeof num[2], last_vio), (long long)st->skipped, start_step);
done:
    free(batch);
    free(st);
    moe_adamw_free(ctx, opt);
    moe_model_free(ctx, m);
    moe_data_free(ctx, data);
    moe_ctx_free(ctx);
    return status;
}
