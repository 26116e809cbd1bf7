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

   Measured with the defaults (teacher 1500 steps, students 1000 steps of 16 x 64 bytes):
   2 cores of a shared, loaded machine, OMP_WAIT_POLICY=passive: 529 s in all; validation
   bits per byte teacher 2.072, scratch student 2.510, distilled student 2.308. On a loaded
   machine set OMP_WAIT_POLICY=passive: spinning OpenMP threads made 2-thread steps ~9x slower. */
#define MOE_IMPLEMENTATION
#include "moe.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

typedef struct options {
    const char *data, *out, *teacher, *teacher_config, *student_config;
    long steps, teacher_steps, batch, seq, threads, topk, val_batches, warmup;
    double lr, teacher_lr, alpha, temperature, lambda, gamma, balance, clip;
    unsigned long long seed;
    int offline, reverse;
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
            "  --batch B              sequences per batch (default 16)\n"
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
            "  --out DIR              teacher checkpoint and cache go here (default out/distill)\n"
            "  --help                 this text\n");
}

static int parse_args(int argc, char **argv, options *o) {
    int i;
    memset(o, 0, sizeof *o);
    o->data = "data/austen.txt"; o->out = "out/distill";
    o->steps = 1000; o->teacher_steps = 1500; o->batch = 16; o->seq = 64; o->topk = 32; o->val_batches = 48; o->warmup = 30;
    o->lr = 3e-3; o->teacher_lr = 2e-3; o->alpha = 0.5; o->temperature = 2.0; o->lambda = 0.3; o->gamma = 1e-3;
    o->balance = 1e-4; o->clip = 1.0; o->seed = 1;
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
        NUM("--balance", balance, DBL, 0) NUM("--clip", clip, DBL, 0)
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

/* Mean next-token loss (nats) over validation batches [0, batches). */
static double val_loss(moe_ctx *ctx, moe_model *m, const moe_dataset *d, long batches, long B, long T, int32_t *buf) {
    double sum = 0;
    long i;
    moe_ctx_set_grad_enabled(ctx, 0);
    for (i = 0; i < batches; i++) {
        moe_tensor *loss;
        moe_loss_parts parts;
        CHECK(moe_data_batch(ctx, d, 1, 0, i, B, T, buf));
        CHECK(moe_model_loss(ctx, m, buf, B, T, NULL, &loss, &parts));
        sum += parts.main;
        moe_ctx_reset(ctx);
    }
    moe_ctx_set_grad_enabled(ctx, 1);
    moe_model_reset_loads(m);
    return sum / (double)batches;
}

typedef enum { RUN_PLAIN, RUN_ONLINE, RUN_OFFLINE } run_kind;

/* Train m for `steps` steps on training batches 0..steps-1 of `seed`; returns seconds. */
static double train(moe_ctx *ctx, const options *o, const char *label, moe_model *m, long steps, double lr_max,
                    const moe_dataset *d, run_kind kind, moe_model *teacher, moe_distill_cache *cache, int32_t *buf) {
    moe_adamw *opt;
    moe_adamw_config ac;
    moe_lr_schedule sched;
    moe_loss_opts lo;
    moe_distill_opts dopt = moe_distill_defaults();
    double t0 = moe_time_s(), ema = 0;
    long step;
    int tty = isatty(2);
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
    for (step = 0; step < steps; step++) {
        moe_tensor *loss;
        double main_loss;
        CHECK(moe_data_batch(ctx, d, 0, o->seed, step, o->batch, o->seq, buf));
        if (kind == RUN_PLAIN) {
            moe_loss_parts p;
            CHECK(moe_model_loss(ctx, m, buf, o->batch, o->seq, &lo, &loss, &p));
            main_loss = p.main;
        } else {
            moe_distill_parts p;
            if (kind == RUN_ONLINE) CHECK(moe_model_distill_loss(ctx, m, teacher, buf, o->batch, o->seq, &lo, &dopt, &loss, &p));
            else CHECK(moe_model_distill_loss_cached(ctx, m, cache, step * o->batch * o->seq, buf, o->batch, o->seq, &lo, &dopt, &loss, &p));
            main_loss = p.ce;
        }
        CHECK(moe_backward(ctx, loss));
        moe_ctx_reset(ctx);
        CHECK(moe_adamw_step(ctx, opt, moe_lr_at(&sched, step), 1.0f, (float)o->clip, NULL));
        CHECK(moe_model_update_expert_bias(ctx, m, (float)o->gamma));
        ema = step == 0 ? main_loss : 0.95 * ema + 0.05 * main_loss;
        progress(label, step + 1, steps, ema, moe_time_s() - t0, tty, 50);
    }
    moe_adamw_free(ctx, opt);
    return moe_time_s() - t0;
}

/* Write the teacher's top-k for the inputs of training batches 0..steps-1 (the order the
   distilled student reads them), unless a cache with the same settings is there. */
static void write_cache(moe_ctx *ctx, const options *o, const char *path, uint64_t tag, moe_model *teacher,
                        const moe_dataset *d, int32_t *buf) {
    moe_distill_cache *c = NULL;
    moe_distill_writer *w;
    int32_t *in = (int32_t *)malloc(sizeof(int32_t) * (size_t)(o->batch * o->seq));
    double t0 = moe_time_s();
    long step, b;
    int tty = isatty(2);
    if (moe_distill_cache_open(ctx, path, &c) == MOE_OK) {
        moe_distill_info info = moe_distill_cache_info(c);
        moe_distill_cache_close(c);
        if (info.tag == tag && info.k == o->topk && info.temperature == (float)o->temperature &&
            info.count == o->steps * o->batch * o->seq) {
            fprintf(stderr, "cache: reusing %s (%lld records, k = %lld)\n", path, (long long)info.count, (long long)info.k);
            free(in);
            return;
        }
    }
    CHECK(moe_distill_writer_new(ctx, path, moe_model_config(teacher)->vocab_size, o->topk, (float)o->temperature, tag, &w));
    moe_ctx_set_grad_enabled(ctx, 0);
    for (step = 0; step < o->steps; step++) {
        moe_tensor *logits;
        CHECK(moe_data_batch(ctx, d, 0, o->seed, step, o->batch, o->seq, buf));
        for (b = 0; b < o->batch; b++) memcpy(in + b * o->seq, buf + b * (o->seq + 1), sizeof(int32_t) * (size_t)o->seq);
        CHECK(moe_model_logits(ctx, teacher, in, o->batch, o->seq, &logits));
        CHECK(moe_distill_writer_add(ctx, w, logits));
        moe_ctx_reset(ctx);
        progress("cache", step + 1, o->steps, 0, moe_time_s() - t0, tty, 100);
    }
    moe_ctx_set_grad_enabled(ctx, 1);
    moe_model_reset_loads(teacher);
    CHECK(moe_distill_writer_finish(ctx, w));
    moe_distill_writer_free(w);
    free(in);
}

int main(int argc, char **argv) {
    options o;
    moe_ctx *ctx = NULL;
    moe_config tc = teacher_config(), sc = student_config();
    moe_model *teacher = NULL, *scratch = NULL, *distilled = NULL;
    moe_dataset *data = NULL;
    moe_distill_cache *cache = NULL;
    moe_train_state st;
    int32_t *batch;
    char path[1024], cache_path[1024];
    double t_start = moe_time_s(), t_teacher = 0, t_cache = 0, t_scratch, t_distill, vb, bpb_t, bpb_s, bpb_d;
    int64_t tot, act, mtp;
    long nval;
    const char *mode;

    if (!parse_args(argc, argv, &o)) return 2;
    if (moe_ctx_new(&ctx) != MOE_OK) return 1;
    if (o.threads) CHECK(moe_ctx_set_threads(ctx, (int)o.threads));
    if (o.teacher_config) CHECK(moe_config_load(ctx, o.teacher_config, &tc));
    if (o.teacher) CHECK(moe_ckpt_config(ctx, o.teacher, &tc));
    if (o.student_config) CHECK(moe_config_load(ctx, o.student_config, &sc));
    if (tc.vocab_size != sc.vocab_size) {
        fprintf(stderr, "distill: the teacher's vocab_size %lld differs from the students' %lld: distillation needs one vocabulary\n",
                (long long)tc.vocab_size, (long long)sc.vocab_size);
        return 2;
    }
    if (o.seq > tc.max_position_embeddings || o.seq > sc.max_position_embeddings) {
        fprintf(stderr, "distill: --seq %ld exceeds max_position_embeddings (teacher %lld, students %lld)\n", o.seq,
                (long long)tc.max_position_embeddings, (long long)sc.max_position_embeddings);
        return 2;
    }
    CHECK(moe_data_load(ctx, o.data, 0.1, &data));
    if (data->vocab > sc.vocab_size) {
        fprintf(stderr, "distill: the data has tokens up to %lld but vocab_size is %lld\n", (long long)data->vocab - 1, (long long)sc.vocab_size);
        return 2;
    }
    make_dirs(o.out);
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
        CHECK(moe_ckpt_load(ctx, o.teacher, teacher, NULL, &st));
        fprintf(stderr, "teacher: loaded %s (trained %lld steps)\n", o.teacher, (long long)st.step);
    } else {
        options to = o;
        to.seed = o.seed + 1000; /* its own data order: the students' batches are new to it too */
        t_teacher = train(ctx, &to, "teacher", teacher, o.teacher_steps, o.teacher_lr, data, RUN_PLAIN, NULL, NULL, batch);
        memset(&st, 0, sizeof st);
        st.step = o.teacher_steps;
        st.seed = to.seed;
        st.data_index = o.teacher_steps;
        st.tokens_seen = (double)(o.teacher_steps * o.batch * o.seq);
        snprintf(path, sizeof path, "%s/teacher.ckpt", o.out);
        CHECK(moe_ckpt_save(ctx, path, teacher, NULL, &st));
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
        write_cache(ctx, &o, cache_path, tag, teacher, data, batch);
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
    t_scratch = train(ctx, &o, "scratch", scratch, o.steps, o.lr, data, RUN_PLAIN, NULL, NULL, batch);
    bpb_s = val_loss(ctx, scratch, data, nval, o.batch, o.seq, batch) / log(2.0);
    fprintf(stderr, "scratch student: validation %.4f bits per byte (%.0f s)\n", bpb_s, t_scratch);
    t_distill = train(ctx, &o, o.offline ? "distill-kc" : "distilled", distilled, o.steps, o.lr, data,
                      o.offline ? RUN_OFFLINE : RUN_ONLINE, teacher, cache, batch);
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
    printf("{\"job\":\"distill\",\"val_bpb_teacher\":%.4f,\"val_bpb_scratch\":%.4f,\"val_bpb_distilled\":%.4f,\"mode\":\"%s\",\"steps\":%ld,"
           "\"teacher_steps\":%ld,\"seconds\":%.1f}\n", bpb_t, bpb_s, bpb_d, mode, o.steps, o.teacher ? 0L : o.teacher_steps,
           moe_time_s() - t_start);
    (void)t_cache;
    moe_distill_cache_close(cache);
    free(batch);
    moe_model_free(ctx, teacher);
    moe_model_free(ctx, scratch);
    moe_model_free(ctx, distilled);
    moe_data_free(ctx, data);
    moe_ctx_free(ctx);
    return 0;
}
