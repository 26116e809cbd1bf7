/* examples/distill.c — knowledge distillation: a small MoE student learns from a larger teacher.

   1. The teacher: trained here on the bundled corpus (or loaded with --teacher CKPT, a
      checkpoint that this program or train_tiny wrote). Its default shape is the small config
      of reference §12 scaled to fit the time budget: byte tokens (vocab_size 256 instead of the
      reference's 4096), hidden 128 instead of 256 and 4 layers instead of 8, keeping MLA with
      q/kv compression, a dense first layer, DeepSeekMoE layers (1 shared + 16 routed experts in
      4 groups, 4 active) and one MTP module. --teacher-config takes any config.json instead.
   2. Two students of the same smaller MoE shape, trained with the same steps, data order and
      seed: one from scratch (cross-entropy), one distilled
          L = α·CE + (1−α)·T²·KL(p_teacher^T ‖ p_student^T)
      from the teacher run forward-only next to it (online, the default) or, with --offline,
      from a file of the teacher's top-k log-probabilities per position written once before
      the student trains (a rerun with the same settings reuses the file).
   3. Validation bits per byte of all three on the same held-out text; the last line is JSON.

       ./build.sh example distill                 # the defaults, online
       ./build.sh example distill --offline       # through the top-k cache
       ./build.sh example distill --teacher out/distill/teacher.ckpt   # reuse the teacher
       ./build.sh example distill --resume auto   # after a kill or Ctrl-C: continue where it stopped

   Each of the three trainings checkpoints itself while it runs (OUT/teacher-<step>.bin,
   OUT/scratch-<step>.bin, OUT/distilled-<step>.bin or distill-kc-<step>.bin for --offline) and
   skips steps whose loss or gradient norm is not finite or spikes, as examples/train_tiny.c
   does (the same flags); --resume auto takes each training up from its newest valid checkpoint,
   bit-identically, and needs the flags of the interrupted run. Exit status: 0 done, 1 error,
   2 bad flags, 3 too many skipped steps in a row, 75 interrupted by SIGINT or SIGTERM (saved).

   Measured with the defaults (teacher 1500 steps, students 1000 steps of 16 x 64 bytes):
   2 cores of a shared, loaded machine, OMP_WAIT_POLICY=passive: 529 s in all; validation
   bits per byte teacher 2.072, scratch student 2.510, distilled student 2.308. On a loaded
   machine set OMP_WAIT_POLICY=passive: spinning OpenMP threads made 2-thread steps ~9x slower.

   Under mpirun (built with mpicc -DMOE_MPI) each of the P ranks trains on its --accum / P of
   every step's micro-batches (and runs the teacher on them), as examples/train_tiny.c does:
   gradients summed over the ranks in rank order, one decision to skip or stop, rank 0 writes
   the checkpoints, the teacher's file and the top-k cache; --zero 1 shards the AdamW moments,
   --ep N spreads the students' (and a trained teacher's) routed experts over groups of N
   ranks. With --accum P the checkpoints are byte-identical to one process with --accum P. */
#define _XOPEN_SOURCE 700 /* sigaction's SA_RESTART */
#define MOE_IMPLEMENTATION
#include "moe.h"

#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAX_INJECT 16
typedef struct options {
    const char *data, *out, *teacher, *teacher_config, *student_config;
    long steps, teacher_steps, batch, seq, threads, topk, val_batches, warmup;
    long save_every, keep, window, max_skips, accum, zero, ep;
    double lr, teacher_lr, alpha, temperature, lambda, gamma, balance, clip, save_seconds, skip_z, skip_grad_z;
    unsigned long long seed;
    int offline, reverse, resume;
    int n_inject;
    struct { int nan_grad; long from, to; } inject[MAX_INJECT]; /* testing aid: faults at these attempts */
} options;

static void usage(FILE *f) {
    fprintf(f,
            "usage: distill [flags]\n"
            "  --teacher CKPT         use this teacher checkpoint instead of training one\n"
            "  --teacher-config FILE  config.json of the teacher to train (default: reference 12's small config,\n"
            "                         byte vocabulary, hidden 128, 4 layers)\n"
            "  --student-config FILE  config.json of the students (default: hidden 64, 2 layers, 8 routed experts)\n"
            "  --teacher-steps N      teacher training steps (default 1500)\n"
            "  --teacher-lr X         teacher peak learning rate (default 2e-3)\n"
            "  --steps N              steps of each student (default 1000)\n"
            "  --lr X                 students' peak learning rate (default 3e-3)\n"
            "  --batch B              sequences per micro-batch (default 16)\n"
            "  --accum N              micro-batches per step (default 1); under mpirun split over the ranks\n"
            "  --zero 1               under mpirun: ZeRO-1, the AdamW moments sharded over the ranks\n"
            "  --ep N                 under mpirun: expert parallelism in groups of N consecutive ranks\n"
            "  --seq T                tokens per sequence (default 64)\n"
            "  --warmup N             warm-up steps of every run (default 30)\n"
            "  --alpha X              weight of the hard-label CE in the distillation loss (default 0.5)\n"
            "  --temperature T        distillation temperature (default 2)\n"
            "  --reverse              reverse KL(student || teacher) instead of forward KL\n"
            "  --offline              distil from a cache of the teacher's top-k log-probs (OUT/teacher_topk.cache)\n"
            "  --topk K               entries per position in the cache (default 32)\n"
            "  --lambda X             MTP loss weight (default 0.3)\n"
            "  --balance X            sequence-wise balance loss weight (default 1e-4)\n"
            "  --gamma X              expert-bias update speed (default 1e-3)\n"
            "  --clip X               gradient-norm clip (default 1.0)\n"
            "  --val-batches N        validation batches of B x T bytes (default 48; 0 = the whole validation text)\n"
            "  --seed N               seed of initialisation and data order (default 1)\n"
            "  --threads N            worker threads (default: all cores)\n"
            "  --data FILE            training text (default data/austen.txt)\n"
            "  --out DIR              checkpoints and the cache go here (default out/distill)\n"
            "  --save-every N         checkpoint every N steps of each training (default 250; 0 = only at its end)\n"
            "  --save-every-seconds S and at least every S seconds (default 120; 0 = off)\n"
            "  --keep K               keep the newest K checkpoints of each training (default 3; 0 = all)\n"
            "  --resume auto          continue each training from its newest valid checkpoint in OUT (the same flags\n"
            "                         as the interrupted run); without it OUT's checkpoints are removed\n"
            "  --skip-loss-z Z        skip a step whose loss is Z standard deviations above the mean of the last\n"
            "                         --skip-window steps' losses (default 8; 0 = off: only a non-finite loss is skipped)\n"
            "  --skip-grad-z Z        the same for the gradient norm (default 50; 0 = off)\n"
            "  --skip-window N        steps in that window (default 64, at most 200)\n"
            "  --max-skips M          stop (exit status 3) after M skipped steps in a row (default 20)\n"
            "  --inject K@A[-B]       testing aid: K = nan-grad (a NaN gradient) or nan-loss at attempts A..B of\n"
            "                         every training (1-based; comma-separated list)\n"
            "  --help                 this text\n"
            "exit status: 0 done, 1 error, 2 bad flags, 3 too many skipped steps in a row, 75 interrupted (saved)\n");
}

static int parse_args(int argc, char **argv, options *o) {
    int i;
    memset(o, 0, sizeof *o);
    o->data = "data/austen.txt"; o->out = "out/distill";
    o->steps = 1000; o->teacher_steps = 1500; o->batch = 16; o->seq = 64; o->topk = 32; o->val_batches = 48; o->warmup = 30;
    o->lr = 3e-3; o->teacher_lr = 2e-3; o->alpha = 0.5; o->temperature = 2.0; o->lambda = 0.3; o->gamma = 1e-3;
    o->balance = 1e-4; o->clip = 1.0; o->seed = 1;
    o->save_every = 250; o->save_seconds = 120; o->keep = 3; o->skip_z = 8; o->skip_grad_z = 50; o->window = 64; o->max_skips = 20;
    o->accum = 1; o->ep = 1;
    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        char *end = NULL;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) { usage(stdout); exit(0); }
        if (strcmp(a, "--offline") == 0) { o->offline = 1; continue; }
        if (strcmp(a, "--reverse") == 0) { o->reverse = 1; continue; }
        if (!v) { fprintf(stderr, "distill: '%s' is unknown or needs a value (see --help)\n", a); return 0; }
        i++;
#define NUM(flag, field, conv, lo)                                                                              \
    if (strcmp(a, flag) == 0) {                                                                                  \
        o->field = conv(v, &end);                                                                                \
        if (!end || *end || !(o->field >= lo)) { fprintf(stderr, "distill: %s wants a number >= %g, got '%s'\n", flag, (double)(lo), v); return 0; } \
        continue;                                                                                                \
    }
#define LNG(s, e) strtol(s, e, 10)
#define DBL(s, e) strtod(s, e)
        NUM("--steps", steps, LNG, 1) NUM("--teacher-steps", teacher_steps, LNG, 0) NUM("--batch", batch, LNG, 1)
        NUM("--seq", seq, LNG, 2) NUM("--threads", threads, LNG, 1) NUM("--topk", topk, LNG, 1) NUM("--val-batches", val_batches, LNG, 0)
        NUM("--warmup", warmup, LNG, 0) NUM("--lr", lr, DBL, 0) NUM("--teacher-lr", teacher_lr, DBL, 0) NUM("--alpha", alpha, DBL, 0)
        NUM("--temperature", temperature, DBL, 1e-3) NUM("--lambda", lambda, DBL, 0) NUM("--gamma", gamma, DBL, 0)
        NUM("--balance", balance, DBL, 0) NUM("--clip", clip, DBL, 0) NUM("--save-every", save_every, LNG, 0)
        NUM("--save-every-seconds", save_seconds, DBL, 0) NUM("--keep", keep, LNG, 0) NUM("--skip-loss-z", skip_z, DBL, 0)
        NUM("--skip-grad-z", skip_grad_z, DBL, 0)
        NUM("--skip-window", window, LNG, 2) NUM("--max-skips", max_skips, LNG, 1) NUM("--accum", accum, LNG, 1)
        NUM("--zero", zero, LNG, 0) NUM("--ep", ep, LNG, 1)
        if (strcmp(a, "--resume") == 0) {
            if (strcmp(v, "auto") != 0) { fprintf(stderr, "distill: --resume takes 'auto' (use --teacher CKPT for a teacher file)\n"); return 0; }
            o->resume = 1;
            continue;
        }
        if (strcmp(a, "--inject") == 0) {
            char buf[512], *tok, *save = NULL;
            snprintf(buf, sizeof buf, "%s", v);
            for (tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
                int grad = strncmp(tok, "nan-grad@", 9) == 0;
                if ((!grad && strncmp(tok, "nan-loss@", 9) != 0) || o->n_inject == MAX_INJECT) break;
                o->inject[o->n_inject].nan_grad = grad;
                o->inject[o->n_inject].from = o->inject[o->n_inject].to = strtol(tok + 9, &end, 10);
                if (end && *end == '-') o->inject[o->n_inject].to = strtol(end + 1, &end, 10);
                if (!end || *end || o->inject[o->n_inject].from < 1 || o->inject[o->n_inject].to < o->inject[o->n_inject].from) break;
                o->n_inject++;
            }
            if (tok) { fprintf(stderr, "distill: --inject wants nan-grad@A[-B] or nan-loss@A[-B], comma-separated, got '%s'\n", v); return 0; }
            continue;
        }
        if (strcmp(a, "--seed") == 0) {
            o->seed = strtoull(v, &end, 10);
            if (!end || *end || *v == '-') { fprintf(stderr, "distill: --seed wants a non-negative integer, got '%s'\n", v); return 0; }
            continue;
        }
        if (strcmp(a, "--teacher") == 0) { o->teacher = v; continue; }
        if (strcmp(a, "--teacher-config") == 0) { o->teacher_config = v; continue; }
        if (strcmp(a, "--student-config") == 0) { o->student_config = v; continue; }
        if (strcmp(a, "--data") == 0) { o->data = v; continue; }
        if (strcmp(a, "--out") == 0) { o->out = v; continue; }
        fprintf(stderr, "distill: unknown flag '%s' (see --help)\n", a);
        return 0;
    }
    if (o->alpha > 1) { fprintf(stderr, "distill: --alpha must be in [0, 1]\n"); return 0; }
    if (o->window > 200) { fprintf(stderr, "distill: --skip-window is at most 200\n"); return 0; }
    if (o->zero > 1) { fprintf(stderr, "distill: --zero %ld: only ZeRO stage 1 is implemented\n", o->zero); return 0; }
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
            fprintf(stderr, "\ndistill: %s: %s\n", moe_status_name(s_), moe_ctx_error(ctx));          \
            exit(1);                                                                                  \
        }                                                                                             \
    } while (0)

/* The job's ranks (one, or mpirun's): the world, the EP and EDP groups of --ep, this rank. */
static struct {
    moe_comm *world, *ep, *edp;
    int rank, size;
} g_ranks;

/* Every rank ends with the same status (MPI is finalised with the world). */
static void finish(int status) {
    moe_comm_free(g_ranks.edp);
    moe_comm_free(g_ranks.ep);
    moe_comm_free(g_ranks.world);
    exit(status);
}

/* The teacher: reference §12's small config with byte tokens, narrowed to fit the budget. */
static moe_config teacher_config(void) {
    moe_config c = moe_config_small();
    c.vocab_size = 256;
    c.hidden_size = 128; c.intermediate_size = 256; c.moe_intermediate_size = 64;
    c.num_hidden_layers = 4; c.first_k_dense_replace = 1; c.num_attention_heads = 4;
    c.q_lora_rank = 64; c.kv_lora_rank = 64; c.qk_nope_head_dim = 32; c.qk_rope_head_dim = 16; c.v_head_dim = 32;
    c.n_routed_experts = 16; c.num_experts_per_tok = 4; c.n_group = 4; c.topk_group = 2;
    c.max_position_embeddings = 128;
    return c;
}
/* The students: the tiny config (§12.1) with half the layers and experts. */
static moe_config student_config(void) {
    moe_config c = moe_config_tiny();
    c.num_hidden_layers = 2;
    c.n_routed_experts = 8; c.num_experts_per_tok = 2; c.n_group = 2; c.topk_group = 1;
    return c;
}

/* One progress line: "[####......] label step i/n  loss x  ETA s", redrawn in place on a
   terminal, printed every `every` steps otherwise. */
static void progress(const char *label, long i, long n, double loss, double elapsed, int tty, long every) {
    char bars[31];
    int bar = (int)(30 * i / n), k;
    double eta = i > 0 ? elapsed * (double)(n - i) / (double)i : 0;
    if (!tty && i % every != 0 && i != n) return;
    for (k = 0; k < 30; k++) bars[k] = k < bar ? '#' : '.';
    bars[30] = 0;
    fprintf(stderr, "%s[%s] %-10s %5ld/%ld  loss %.3f  %5.0fs  ETA %4.0fs%s", tty ? "\r" : "", bars, label, i, n, loss, elapsed, eta,
            tty ? "  " : "\n");
    if (tty && i == n) fprintf(stderr, "\n");
}

/* Mean next-token loss (nats) over validation batches [0, batches); NAN (with a message) when
   it cannot be measured, e.g. on a validation text shorter than one sequence. */
static double val_loss(moe_ctx *ctx, moe_model *m, const moe_dataset *d, long batches, long B, long T, int32_t *buf) {
    double sum = 0;
    long i;
    moe_status s = MOE_OK;
    moe_ctx_set_grad_enabled(ctx, 0);
    for (i = 0; i < batches && s == MOE_OK; i++) {
        moe_tensor *loss;
        moe_loss_parts parts;
        s = moe_data_batch(ctx, d, 1, 0, i, B, T, buf);
        if (s == MOE_OK) s = moe_model_loss(ctx, m, buf, B, T, NULL, &loss, &parts);
        if (s == MOE_OK) sum += parts.main;
        moe_ctx_reset(ctx);
    }
    moe_ctx_set_grad_enabled(ctx, 1);
    moe_model_reset_loads(m);
    if (s != MOE_OK) fprintf(stderr, "distill: no validation: %s\n", moe_ctx_error(ctx));
    return s == MOE_OK ? sum / (double)batches : NAN;
}

/* A number for the JSON line, or null when it is not finite. */
static const char *json_num(char *buf, size_t cap, double v) {
    if (isfinite(v)) snprintf(buf, cap, "%.4f", v);
    else snprintf(buf, cap, "null");
    return buf;
}

typedef enum { RUN_PLAIN, RUN_ONLINE, RUN_OFFLINE } run_kind;

/* ---- what a checkpoint of one training keeps (moe_train_state.user) ----
   A fingerprint of the flags that decide the weights (a resume with other flags is refused),
   then the spike guard: skipped steps in a row, values in the window, the next slot, the
   window of losses and the window of gradient norms. */
enum { U_LAYOUT, U_FLAGS_LO, U_FLAGS_HI, U_IN_A_ROW, U_COUNT, U_NEXT, U_WIN };
#define LAYOUT 20261209.0

static uint64_t flags_fingerprint(const options *o, const char *label, long steps, double lr, run_kind kind) {
    char text[2048];
    uint64_t h = 0xCBF29CE484222325ull;
    size_t i, n;
    n = (size_t)snprintf(text, sizeof text, "%s %ld %.17g %llu %ld %ld %ld %.17g %.17g %.17g %.17g %.17g %.17g %ld %ld %s %s", label, steps, lr,
                         o->seed, o->batch, o->seq, o->warmup, o->lambda, o->gamma, o->balance, o->clip, o->skip_z, o->skip_grad_z, o->window,
                         o->max_skips, o->data, kind == RUN_PLAIN && !strcmp(label, "teacher") ? (o->teacher_config ? o->teacher_config : "")
                                                                                                  : (o->student_config ? o->student_config : ""));
    if (kind != RUN_PLAIN && n < sizeof text) /* the distillation settings and the teacher */
        snprintf(text + n, sizeof text - n, " %.17g %.17g %d %ld %s %s %ld %.17g", o->alpha, o->temperature, o->reverse, o->topk,
                 o->teacher ? o->teacher : "", o->teacher_config ? o->teacher_config : "", o->teacher_steps, o->teacher_lr);
    n = strlen(text);
    if (o->accum != 1 && n < sizeof text) /* the ranks do not matter, the sum does (1: the fingerprint of earlier builds) */
        snprintf(text + n, sizeof text - n, " accum %ld", o->accum);
    for (i = 0; text[i]; i++) h = (h ^ (unsigned char)text[i]) * 0x100000001B3ull;
    return h;
}

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

static int injected(const options *o, int nan_grad, long attempt) {
    int i;
    for (i = 0; i < o->n_inject; i++)
        if (o->inject[i].nan_grad == nan_grad && attempt >= o->inject[i].from && attempt <= o->inject[i].to) return 1;
    return 0;
}

static volatile sig_atomic_t g_signal;
static void on_signal(int sig) { g_signal = sig; }

/* After what only rank 0 does to OUT's files (writes, the search for a checkpoint, removals):
   its status to every rank, so that a failure stops them all. Rank 0 says why before the
   agreement (once another rank has exited, mpirun may end it), the others that rank 0 could
   not <what>; then every rank exits with status 1. */
static void agree_rank0(moe_ctx *ctx, moe_status s, const char *what) {
    int64_t agreed = (int64_t)s;
    if (s != MOE_OK) {
        fprintf(stderr, "\ndistill: could not %s: %s: %s\n", what, moe_status_name(s), moe_ctx_error(ctx));
        fflush(stderr);
    }
    CHECK(moe_comm_bcast(ctx, g_ranks.world, &agreed, 1, MOE_COMM_I64, 0));
    if (agreed != MOE_OK) { /* everyone has said why before any rank exits */
        if (g_ranks.rank != 0) fprintf(stderr, "\ndistill: rank 0 could not %s: stopping\n", what);
        fflush(stderr);
        moe_comm_barrier(ctx, g_ranks.world);
        exit(1);
    }
}

/* Rank 0 writes; with ZeRO-1 every rank takes part (the moments are gathered, the save agrees
   its status). */
static void save(moe_ctx *ctx, const options *o, const char *label, moe_model *m, moe_adamw *opt, moe_train_state *st, char *path) {
    char what[128];
    if (o->zero) {
        CHECK(moe_ckpt_save_step(ctx, o->out, label, (int)o->keep, m, opt, st, path, 1100));
        return;
    }
    snprintf(what, sizeof what, "write the %s checkpoint of step %lld", label, (long long)st->step);
    agree_rank0(ctx, g_ranks.rank == 0 ? moe_ckpt_save_step(ctx, o->out, label, (int)o->keep, m, opt, st, path, 1100) : MOE_OK,
                what);
}

/* Train m for `steps` steps on training batches from index 0 of `seed`, checkpointing as it
   goes (OUT/<label>-<step>.bin) and, with --resume auto, starting from the newest of those;
   returns this run's seconds and adds the steps skipped so far to *skipped. */
static double train(moe_ctx *ctx, const options *o, const char *label, moe_model *m, long steps, double lr_max,
                    const moe_dataset *d, run_kind kind, moe_model *teacher, moe_distill_cache *cache, int32_t *buf, long *skipped) {
    moe_adamw *opt;
    moe_adamw_config ac;
    moe_lr_schedule sched;
    moe_loss_opts lo;
    moe_distill_opts dopt = moe_distill_defaults();
    moe_train_state *st = (moe_train_state *)calloc(1, sizeof *st);
    double t0 = moe_time_s(), ema = 0, saved_at = t0;
    uint64_t fp = flags_fingerprint(o, label, steps, lr_max, kind);
    long saved_attempts = -1, run_steps = 0;
    char path[1100] = "", found[1100] = "";
    int tty = isatty(2), removed = 0;
    if (!st) exit(1);
    memset(&ac, 0, sizeof ac);
    CHECK(moe_adamw_new(ctx, m, &ac, &opt));
    memset(&sched, 0, sizeof sched);
    sched.shape = MOE_LR_COSINE; sched.lr_max = (float)lr_max; sched.lr_min = (float)lr_max / 10;
    sched.warmup_steps = o->warmup; sched.total_steps = steps;
    lo.mtp_lambda = (float)o->lambda;
    lo.balance_alpha = (float)o->balance;
    dopt.alpha = (float)o->alpha;
    dopt.temperature = (float)o->temperature;
    dopt.direction = o->reverse ? MOE_KL_REVERSE : MOE_KL_FORWARD;
    st->seed = o->seed;
    st->total_steps = steps;
    st->n_user = U_WIN + 2 * o->window;
    st->user[U_LAYOUT] = LAYOUT;
    st->user[U_FLAGS_LO] = (double)(fp & 0xFFFFFFFFu);
    st->user[U_FLAGS_HI] = (double)(fp >> 32);
    if (o->resume) agree_rank0(ctx, g_ranks.rank == 0 ? moe_ckpt_latest(ctx, o->out, label, found, sizeof found) : MOE_OK,
                               "look for a checkpoint to resume from");
    CHECK(moe_comm_bcast(ctx, g_ranks.world, found, (int64_t)sizeof found, MOE_COMM_BYTE, 0)); /* rank 0's files */
    if (found[0]) {
        CHECK(moe_ckpt_load(ctx, found, m, opt, st));
        if (st->n_user != U_WIN + 2 * o->window || st->user[U_LAYOUT] != LAYOUT || st->user[U_FLAGS_LO] != (double)(fp & 0xFFFFFFFFu) ||
            st->user[U_FLAGS_HI] != (double)(fp >> 32) || st->total_steps != steps) {
            fprintf(stderr, "distill: %s was written with other flags: resume with the flags of the interrupted run, or start "
                            "afresh without --resume\n", found);
            finish(2);
        }
        snprintf(path, sizeof path, "%s", found);
        saved_attempts = (long)(st->step + st->skipped);
        if (st->step < steps) fprintf(stderr, "%s: resumed from %s at step %lld of %ld\n", label, found, (long long)st->step, steps);
    }
    agree_rank0(ctx, g_ranks.rank == 0 ? moe_ckpt_clean(ctx, o->out, label, found[0] ? st->step : -1, &removed) : MOE_OK,
                "remove the checkpoints after the resumed one"); /* later (or, afresh, all) */
    if (removed && !found[0]) fprintf(stderr, "%s: removed %d checkpoint%s of an earlier run from %s\n", label, removed, removed > 1 ? "s" : "", o->out);
    if (o->zero) CHECK(moe_adamw_shard(ctx, opt, g_ranks.world)); /* after the load: each rank keeps its shard */
    if (g_ranks.ep) CHECK(moe_model_expert_parallel(ctx, m, g_ranks.ep, g_ranks.edp));
    while (st->step < steps) {
        long attempt = (long)(st->step + st->skipped) + 1, first = (long)st->data_index, local = o->accum / g_ranks.size, a;
        double main_loss = 0, total = 0, zl, zg, sums[2];
        float gn = NAN;
        const char *why = NULL;
        int64_t bad;
        st->data_index += o->accum; /* a skipped step's batches are consumed too */
        if (kind == RUN_OFFLINE && (first + o->accum) * o->batch * o->seq > moe_distill_cache_info(cache).count) {
            fprintf(stderr, "\ndistill: the teacher cache covers %lld positions; the skipped steps used them up (rerun with fewer "
                            "skips, or online)\n", (long long)moe_distill_cache_info(cache).count);
            finish(1);
        }
        for (a = 0; a < local && !why; a++) { /* this rank's micro-batches: [rank·local, (rank + 1)·local) of the step's */
            long index = first + g_ranks.rank * local + a;
            double step_total = NAN, step_main = NAN;
            moe_tensor *loss = NULL, *emb = NULL;
            float keep = 0;
            CHECK(moe_data_batch(ctx, d, 0, st->seed, index, o->batch, o->seq, buf));
            if (a == 0 && g_ranks.rank == 0 && injected(o, 0, attempt)) { /* a NaN in one embedding during this forward only */
                emb = moe_model_find(m, "model.embed_tokens.weight");
                keep = (float)moe_tensor_get(emb, (int64_t)buf[0] * moe_model_config(m)->hidden_size);
                moe_tensor_set(emb, (int64_t)buf[0] * moe_model_config(m)->hidden_size, NAN);
            }
            if (kind == RUN_PLAIN) {
                moe_loss_parts p;
                CHECK(moe_model_loss(ctx, m, buf, o->batch, o->seq, &lo, &loss, &p));
                step_main = p.main;
                step_total = p.total;
            } else {
                moe_distill_parts p;
                moe_status ls;
                if (kind == RUN_ONLINE) ls = moe_model_distill_loss(ctx, m, teacher, buf, o->batch, o->seq, &lo, &dopt, &loss, &p);
                else ls = moe_model_distill_loss_cached(ctx, m, cache, index * o->batch * o->seq, buf, o->batch, o->seq, &lo, &dopt, &loss, &p);
                if (ls != MOE_ERR_NUMERIC) CHECK(ls); /* a non-finite loss is refused there: skipped below */
                step_main = ls == MOE_OK ? p.ce : NAN;
                step_total = ls == MOE_OK ? p.total : NAN;
            }
            if (emb) moe_tensor_set(emb, (int64_t)buf[0] * moe_model_config(m)->hidden_size, keep);
            bad = !isfinite(step_total);
            if (g_ranks.ep) CHECK(moe_comm_allreduce(ctx, g_ranks.world, &bad, 1, MOE_COMM_I64, MOE_COMM_MAX)); /* backward is a collective */
            if (bad) why = isfinite(step_total) ? "another rank's loss is not finite" : "the loss is not finite";
            else CHECK(moe_backward(ctx, loss));
            moe_ctx_reset(ctx);
            if (!why && local > 1) CHECK(moe_model_accumulate_grads(ctx, m)); /* the micro-batch's gradient, then added */
            total += step_total;
            main_loss += step_main;
        }
        sums[0] = total; /* every rank's in rank order, and one decision to skip */
        sums[1] = main_loss;
        bad = why != NULL;
        CHECK(moe_comm_allreduce_ordered(ctx, g_ranks.world, sums, 2, MOE_COMM_F64));
        CHECK(moe_comm_allreduce(ctx, g_ranks.world, &bad, 1, MOE_COMM_I64, MOE_COMM_MAX));
        total = sums[0] / (double)o->accum;
        main_loss = sums[1] / (double)o->accum;
        if (bad && !why) why = "another rank's loss is not finite";
        if (!why) {
            CHECK(moe_model_reduce_grads(ctx, m, g_ranks.world)); /* the step's gradient: every micro-batch's, summed */
            if (injected(o, 1, attempt)) {
                int64_t i;
                for (i = 0; i < moe_model_tensor_count(m); i++) {
                    int is_param = 0;
                    moe_tensor *t = moe_model_tensor(m, i, NULL, &is_param);
                    if (is_param && t->grad) { moe_tensor_set(t->grad, 0, NAN); break; }
                }
            }
            CHECK(moe_adamw_grad_norm(ctx, opt, 1.0f / (float)o->accum, &gn));
            zl = zscore(st->user + U_WIN, o->window, (long)st->user[U_COUNT], total);
            zg = zscore(st->user + U_WIN + o->window, o->window, (long)st->user[U_COUNT], gn);
            if (!isfinite(gn)) why = "the gradient norm is not finite";
            else if (o->skip_z > 0 && zl > o->skip_z) why = "the loss spikes";
            else if (o->skip_grad_z > 0 && zg > o->skip_grad_z) why = "the gradient norm spikes";
        }
        if (why) { /* nothing changes but the data position and the counts */
            moe_model_zero_grad(m);
            moe_model_reset_loads(m);
            st->skipped++;
            st->user[U_IN_A_ROW] += 1;
            fprintf(stderr, "%s%s: step %lld skipped: %s (%.0f in a row)\n", tty ? "\n" : "", label, (long long)st->step + 1, why,
                    st->user[U_IN_A_ROW]);
            if (st->user[U_IN_A_ROW] >= (double)o->max_skips) {
                save(ctx, o, label, m, opt, st, path);
                fprintf(stderr, "distill: %ld steps in a row skipped: stopping; the last good state is in %s (then --resume auto)\n",
                        o->max_skips, path);
                finish(3);
            }
        } else {
            long next = (long)st->user[U_NEXT];
            CHECK(moe_adamw_step(ctx, opt, moe_lr_at(&sched, st->step), 1.0f / (float)o->accum, (float)o->clip, NULL));
            CHECK(moe_model_update_expert_bias(ctx, m, (float)o->gamma));
            st->user[U_WIN + next] = total;
            st->user[U_WIN + o->window + next] = gn;
            st->user[U_NEXT] = (double)((next + 1) % o->window);
            if (st->user[U_COUNT] < (double)o->window) st->user[U_COUNT] += 1;
            st->user[U_IN_A_ROW] = 0;
            st->step++;
            st->tokens_seen += (double)(o->accum * o->batch * o->seq);
            run_steps++;
            ema = ema == 0 ? main_loss : 0.95 * ema + 0.05 * main_loss;
            progress(label, (long)st->step, steps, ema, moe_time_s() - t0, tty, 50);
        }
        {   /* a signal or a save that is due on any rank: every rank acts after the same step */
            int64_t due[2];
            due[0] = g_signal;
            due[1] = o->save_seconds > 0 && moe_time_s() - saved_at >= o->save_seconds;
            CHECK(moe_comm_allreduce(ctx, g_ranks.world, due, 2, MOE_COMM_I64, MOE_COMM_MAX));
            if (st->step < steps && ((!why && o->save_every > 0 && st->step % o->save_every == 0) || due[1])) {
                save(ctx, o, label, m, opt, st, path);
                saved_attempts = (long)(st->step + st->skipped);
                saved_at = moe_time_s();
            }
            if (due[0]) {
                save(ctx, o, label, m, opt, st, path);
                fprintf(stderr, "%sinterrupted by %s in %s after step %lld: saved %s; continue with --resume auto (exit status 75)\n",
                        tty ? "\n" : "", due[0] == SIGINT ? "SIGINT" : "SIGTERM", label, (long long)st->step, path);
                finish(75);
            }
        }
    }
    if (saved_attempts != (long)(st->step + st->skipped)) save(ctx, o, label, m, opt, st, path); /* the finished training */
    *skipped += (long)st->skipped;
    if (g_ranks.ep) CHECK(moe_model_expert_parallel(ctx, m, NULL, NULL)); /* evaluation and the teacher's use: each rank alone */
    moe_adamw_free(ctx, opt);
    free(st);
    (void)run_steps;
    return moe_time_s() - t0;
}

/* Training batches the cache covers: the steps, and room for a few skipped ones (a skipped step
   consumes its batch). */
static long cache_batches(const options *o) { return (o->steps + o->steps / 50 + 10) * o->accum; }

/* Write the teacher's top-k for the inputs of training batches 0..steps-1 (the order the
   distilled student reads them), unless a cache with the same settings is there. */
/* Rank 0's job: the teacher's top-k over the students' batches, or the cache already there when
   it was made for the same data, teacher and k. A status (the caller tells the other ranks). */
static moe_status write_cache(moe_ctx *ctx, const options *o, const char *path, uint64_t tag, moe_model *teacher,
                              const moe_dataset *d, int32_t *buf) {
    moe_distill_cache *c = NULL;
    moe_distill_writer *w = NULL;
    int32_t *in = (int32_t *)malloc(sizeof(int32_t) * (size_t)(o->batch * o->seq));
    double t0 = moe_time_s();
    long step, b;
    int tty = isatty(2);
    moe_status s = MOE_OK;
    if (!in) {
        fprintf(stderr, "distill: no memory for the cache's token buffer\n");
        return MOE_ERR_MEMORY;
    }
    if (moe_distill_cache_open(ctx, path, &c) == MOE_OK) {
        moe_distill_info info = moe_distill_cache_info(c);
        moe_distill_cache_close(c);
        if (info.tag == tag && info.k == o->topk && info.temperature == (float)o->temperature &&
            info.count == cache_batches(o) * o->batch * o->seq) {
            fprintf(stderr, "cache: reusing %s (%lld records, k = %lld)\n", path, (long long)info.count, (long long)info.k);
            free(in);
            return MOE_OK;
        }
    }
    s = moe_distill_writer_new(ctx, path, moe_model_config(teacher)->vocab_size, o->topk, (float)o->temperature, tag, &w);
    moe_ctx_set_grad_enabled(ctx, 0);
    for (step = 0; s == MOE_OK && step < cache_batches(o); step++) {
        moe_tensor *logits;
        s = moe_data_batch(ctx, d, 0, o->seed, step, o->batch, o->seq, buf);
        for (b = 0; s == MOE_OK && b < o->batch; b++) memcpy(in + b * o->seq, buf + b * (o->seq + 1), sizeof(int32_t) * (size_t)o->seq);
        if (s == MOE_OK) s = moe_model_logits(ctx, teacher, in, o->batch, o->seq, &logits);
        if (s == MOE_OK) s = moe_distill_writer_add(ctx, w, logits);
        moe_ctx_reset(ctx);
        if (s == MOE_OK) progress("cache", step + 1, cache_batches(o), 0, moe_time_s() - t0, tty, 100);
    }
    moe_ctx_set_grad_enabled(ctx, 1);
    moe_model_reset_loads(teacher);
    if (s == MOE_OK) s = moe_distill_writer_finish(ctx, w);
    moe_distill_writer_free(w);
    free(in);
    return s;
}

int main(int argc, char **argv) {
    options o;
    moe_ctx *ctx = NULL;
    moe_config tc = teacher_config(), sc = student_config();
    moe_model *teacher = NULL, *scratch = NULL, *distilled = NULL;
    moe_dataset *data = NULL;
    moe_distill_cache *cache = NULL;
    moe_train_state *st = (moe_train_state *)calloc(1, sizeof *st);
    struct sigaction sa;
    int32_t *batch;
    char path[1024], cache_path[1024], what[1100], num[3][32];
    long skipped = 0;
    int removed = 0;
    double t_start = moe_time_s(), t_teacher = 0, t_cache = 0, t_scratch, t_distill, vb, bpb_t, bpb_s, bpb_d;
    int64_t tot, act, mtp;
    long nval;
    const char *mode;

    if (!parse_args(argc, argv, &o)) return 2;
    if (!st || moe_ctx_new(&ctx) != MOE_OK) return 1;
    CHECK(moe_comm_init(ctx, MOE_COMM_DEFAULT, &g_ranks.world)); /* MPI when built with MOE_MPI */
    g_ranks.rank = moe_comm_rank(g_ranks.world);
    g_ranks.size = moe_comm_size(g_ranks.world);
    if (o.accum % g_ranks.size != 0 || g_ranks.size % o.ep != 0) { /* every rank finds it: they end together */
        fprintf(stderr, "distill: --accum %ld must be a multiple of the %d ranks, and --ep %ld divide them\n", o.accum, g_ranks.size, o.ep);
        finish(2);
    }
    if (g_ranks.rank != 0) { /* one voice: the others' messages go to OUT/rank-<r>.log */
        make_dirs(o.out);
        snprintf(path, sizeof path, "%s/rank-%d.log", o.out, g_ranks.rank);
        if (!freopen(path, "w", stderr) || !freopen("/dev/null", "w", stdout)) return 1;
    }
    if (o.ep > 1) { /* EP groups of consecutive ranks; EDP groups: the same place in each */
        CHECK(moe_comm_split(ctx, g_ranks.world, g_ranks.rank / (int)o.ep, g_ranks.rank, &g_ranks.ep));
        if (g_ranks.size > o.ep) CHECK(moe_comm_split(ctx, g_ranks.world, g_ranks.rank % (int)o.ep, g_ranks.rank, &g_ranks.edp));
    }
    if (o.threads) CHECK(moe_ctx_set_threads(ctx, (int)o.threads));
    if (o.teacher_config) CHECK(moe_config_load(ctx, o.teacher_config, &tc));
    if (o.teacher) CHECK(moe_ckpt_config(ctx, o.teacher, &tc));
    if (o.student_config) CHECK(moe_config_load(ctx, o.student_config, &sc));
    if (tc.vocab_size != sc.vocab_size) {
        fprintf(stderr, "distill: the teacher's vocab_size %lld differs from the students' %lld: distillation needs one vocabulary\n",
                (long long)tc.vocab_size, (long long)sc.vocab_size);
        finish(2);
    }
    if (o.seq > tc.max_position_embeddings || o.seq > sc.max_position_embeddings) {
        fprintf(stderr, "distill: --seq %ld exceeds max_position_embeddings (teacher %lld, students %lld)\n", o.seq,
                (long long)tc.max_position_embeddings, (long long)sc.max_position_embeddings);
        finish(2);
    }
    CHECK(moe_data_load(ctx, o.data, 0.1, &data));
    if (data->vocab > sc.vocab_size) {
        fprintf(stderr, "distill: the data has tokens up to %lld but vocab_size is %lld\n", (long long)data->vocab - 1, (long long)sc.vocab_size);
        finish(2);
    }
    make_dirs(o.out);
    /* temporaries of a process killed while writing (a checkpoint, the cache) */
    agree_rank0(ctx, g_ranks.rank == 0 ? moe_ckpt_clean(ctx, o.out, NULL, -1, &removed) : MOE_OK, "remove a killed run's temporaries");
    if (removed) fprintf(stderr, "removed %d temporary file%s left in %s by a killed run\n", removed, removed > 1 ? "s" : "", o.out);
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sa.sa_flags = SA_RESTART | SA_RESETHAND; /* a second signal ends the process at once */
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    batch = (int32_t *)malloc(sizeof(int32_t) * (size_t)(o.batch * (o.seq + 1)));
    nval = o.val_batches ? o.val_batches : (long)((data->n_tokens - data->n_train - 1) / o.seq) / o.batch;
    if (nval < 1) nval = 1;
    mode = o.offline ? "offline" : "online";

    /* 1. the teacher */
    CHECK(moe_model_new(ctx, &tc, o.seed + 1000, &teacher));
    moe_model_param_counts(teacher, &tot, &act, &mtp);
    fprintf(stderr, "teacher: %lld parameters (%lld active per token, +%lld MTP), hidden %lld, %lld layers, %lld routed experts\n",
            (long long)tot, (long long)act, (long long)mtp, (long long)tc.hidden_size, (long long)tc.num_hidden_layers,
            (long long)tc.n_routed_experts);
    if (o.teacher) {
        CHECK(moe_ckpt_load(ctx, o.teacher, teacher, NULL, st));
        fprintf(stderr, "teacher: loaded %s (trained %lld steps)\n", o.teacher, (long long)st->step);
    } else {
        options to = o;
        to.seed = o.seed + 1000; /* its own data order: the students' batches are new to it too */
        t_teacher = train(ctx, &to, "teacher", teacher, o.teacher_steps, o.teacher_lr, data, RUN_PLAIN, NULL, NULL, batch, &skipped);
        memset(st, 0, sizeof *st);
        st->step = o.teacher_steps;
        st->seed = to.seed;
        st->data_index = o.teacher_steps * o.accum;
        st->tokens_seen = (double)(o.teacher_steps * o.accum * o.batch * o.seq);
        snprintf(path, sizeof path, "%s/teacher.ckpt", o.out);
        snprintf(what, sizeof what, "write %s", path);
        agree_rank0(ctx, g_ranks.rank == 0 ? moe_ckpt_save(ctx, path, teacher, NULL, st) : MOE_OK, what);
        fprintf(stderr, "teacher: %ld steps in %.0f s, saved to %s (reuse it with --teacher)\n", o.teacher_steps, t_teacher, path);
    }
    vb = val_loss(ctx, teacher, data, nval, o.batch, o.seq, batch);
    bpb_t = vb / log(2.0);
    fprintf(stderr, "teacher: validation %.4f bits per byte\n", bpb_t);

    /* 2. the cache (offline) */
    if (o.offline) {
        uint64_t tag = moe_rng_hash(o.seed, (uint64_t)(o.batch * 1000003 + o.seq));
        tag = moe_rng_hash(tag, (uint64_t)data->n_tokens ^ ((uint64_t)o.steps << 40));
        tag = moe_rng_hash(tag, (uint64_t)(vb * 1e9)); /* a different teacher makes a different tag */
        snprintf(cache_path, sizeof cache_path, "%s/teacher_topk.cache", o.out);
        t_cache = moe_time_s();
        snprintf(what, sizeof what, "write %s", cache_path);
        agree_rank0(ctx, g_ranks.rank == 0 ? write_cache(ctx, &o, cache_path, tag, teacher, data, batch) : MOE_OK, what);
        CHECK(moe_distill_cache_open(ctx, cache_path, &cache));
        t_cache = moe_time_s() - t_cache;
        fprintf(stderr, "cache: %s, %lld records of the top %ld (%.0f MB), %.0f s\n", cache_path,
                (long long)moe_distill_cache_info(cache).count, o.topk,
                (double)moe_distill_cache_info(cache).count * (double)(8 * o.topk + 4) / 1e6, t_cache);
    }

    /* 3. the two students: same config, seed, data order and steps */
    CHECK(moe_model_new(ctx, &sc, o.seed, &scratch));
    CHECK(moe_model_new(ctx, &sc, o.seed, &distilled));
    moe_model_param_counts(scratch, &tot, &act, &mtp);
    fprintf(stderr, "students: %lld parameters (%lld active per token, +%lld MTP), hidden %lld, %lld layers, %lld routed experts; "
            "%ld steps of %ld x %ld bytes\n", (long long)tot, (long long)act, (long long)mtp, (long long)sc.hidden_size,
            (long long)sc.num_hidden_layers, (long long)sc.n_routed_experts, o.steps, o.batch, o.seq);
    t_scratch = train(ctx, &o, "scratch", scratch, o.steps, o.lr, data, RUN_PLAIN, NULL, NULL, batch, &skipped);
    bpb_s = val_loss(ctx, scratch, data, nval, o.batch, o.seq, batch) / log(2.0);
    fprintf(stderr, "scratch student: validation %.4f bits per byte (%.0f s)\n", bpb_s, t_scratch);
    t_distill = train(ctx, &o, o.offline ? "distill-kc" : "distilled", distilled, o.steps, o.lr, data,
                      o.offline ? RUN_OFFLINE : RUN_ONLINE, teacher, cache, batch, &skipped);
    bpb_d = val_loss(ctx, distilled, data, nval, o.batch, o.seq, batch) / log(2.0);
    fprintf(stderr, "distilled student: validation %.4f bits per byte (%.0f s)\n", bpb_d, t_distill);

    printf("\nvalidation bits per byte on %ld x %ld x %ld held-out bytes:\n", nval, o.batch, o.seq);
    printf("  teacher            %.4f\n", bpb_t);
    printf("  student, scratch   %.4f   (%ld steps, %.0f s)\n", bpb_s, o.steps, t_scratch);
    printf("  student, distilled %.4f   (%ld steps, %.0f s, %s, %s KL, alpha %g, T %g%s)\n", bpb_d, o.steps, t_distill, mode,
           o.reverse ? "reverse" : "forward", o.alpha, o.temperature, o.offline ? ", top-k cache" : "");
    if (bpb_d < bpb_s) printf("distillation improves the student by %.4f bits per byte at equal steps", bpb_s - bpb_d);
    else printf("distillation does not beat training from scratch here (%.4f bits per byte worse)", bpb_d - bpb_s);
    printf("; total %.0f s\n", moe_time_s() - t_start);
    printf("{\"job\":\"distill\",\"val_bpb_teacher\":%s,\"val_bpb_scratch\":%s,\"val_bpb_distilled\":%s,\"mode\":\"%s\",\"steps\":%ld,"
           "\"teacher_steps\":%ld,\"skipped\":%ld,\"seconds\":%.1f}\n", json_num(num[0], sizeof num[0], bpb_t),
           json_num(num[1], sizeof num[1], bpb_s), json_num(num[2], sizeof num[2], bpb_d), mode, o.steps, o.teacher ? 0L : o.teacher_steps,
           skipped, moe_time_s() - t_start);
    (void)t_cache;
    moe_distill_cache_close(cache);
    free(st);
    free(batch);
    moe_model_free(ctx, teacher);
    moe_model_free(ctx, scratch);
    moe_model_free(ctx, distilled);
    moe_data_free(ctx, data);
    moe_ctx_free(ctx);
    finish(0);
    return 0;
}
