/* tests/test_trainer.c — the example trainers' fault handling, run as programs.

   Each case runs build/train_tiny (or build/distill) on a small corpus under build/trainer_<pid>/
   and checks what a user would: exit statuses, messages, the files left behind, and the
   checkpoints' bytes. Cases:
     - a step skipped by the guard (NaN gradient, NaN loss, gradient spike) changes no weight,
       moment, expert bias or step count: the checkpoint saved when the guard gives up equals
       the one before the step, record for record;
     - skipped steps are counted in log.csv and the JSON line and the run goes on;
     - --max-skips skipped steps in a row stop the run with status 3 and the last good state;
     - SIGTERM saves and exits 75; --resume auto alone (the settings come from the checkpoint)
       then ends bit-identical to an uninterrupted run, with log.csv truncated to the checkpoint
       (junk rows and a torn row removed) and stale temporaries removed;
     - --resume auto skips a corrupt newest checkpoint with a message;
     - a fresh run removes an earlier run's checkpoints; the HF export is named by its step;
     - a validation text shorter than a sequence gives "val_bpb":null with a reason, no nan;
     - distill: SIGTERM in two of its trainings and --resume auto give the uninterrupted
       result; other flags are refused; its guard counts skipped steps.
   Needs build/train_tiny, build/distill and data/austen.txt (./build.sh test trainer builds them). */
#define _XOPEN_SOURCE 700
#define MOE_IMPLEMENTATION
#include "moe.h"
#include "test.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static char g_dir[256], g_data[300], g_tiny_data[300];

/* ---- running the programs ---- */

#define MAX_ARGS 64
/* Start prog with the NULL-terminated args, stdout and stderr appended to log. */
static pid_t spawn_v(const char *log, const char *prog, va_list ap) {
    const char *argv[MAX_ARGS + 2];
    const char *a;
    int n = 0;
    pid_t pid;
    argv[n++] = prog;
    while ((a = va_arg(ap, const char *)) != NULL && n < MAX_ARGS) argv[n++] = a;
    argv[n] = NULL;
    fflush(stdout);
    pid = fork();
    if (pid == 0) {
        int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (fd >= 0) { dup2(fd, 1); dup2(fd, 2); close(fd); }
        execv(prog, (char *const *)argv);
        _exit(127);
    }
    return pid;
}
static pid_t spawn(const char *log, const char *prog, ...) {
    va_list ap;
    pid_t pid;
    va_start(ap, prog);
    pid = spawn_v(log, prog, ap);
    va_end(ap);
    return pid;
}
/* The exit status (128 + signal when killed). */
static int wait_status(pid_t pid) {
    int st = 0;
    if (pid <= 0) return -1;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {}
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}
static int run(const char *log, const char *prog, ...) {
    va_list ap;
    pid_t pid;
    va_start(ap, prog);
    pid = spawn_v(log, prog, ap);
    va_end(ap);
    return wait_status(pid);
}
#define TINY "build/train_tiny"
#define DISTILL "build/distill"
/* the flags every train_tiny run here shares */
#define SMALL "--data", g_data, "--batch", "4", "--seq", "32", "--sample", "0", "--seconds", "0", "--val-every", "1000", \
              "--save-every-seconds", "0"

static char *slurp(const char *path, long *len) {
    FILE *f = fopen(path, "rb");
    char *b;
    long n;
    if (len) *len = -1;
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fseek(f, 0, SEEK_SET);
    b = (char *)malloc((size_t)n + 1);
    if (b && fread(b, 1, (size_t)n, f) != (size_t)n) { free(b); b = NULL; }
    fclose(f);
    if (b) b[n] = 0;
    if (len && b) *len = n;
    return b;
}
static int has(const char *path, const char *needle) {
    char *b = slurp(path, NULL);
    int yes = b && strstr(b, needle);
    free(b);
    return yes;
}
static int exists(const char *path) { return access(path, F_OK) == 0; }
/* a/b into buf (512 bytes; the paths here are short) */
static const char *pth(char *buf, const char *a, const char *b) {
    size_t la = strlen(a), lb = strlen(b);
    if (la + lb + 2 > 512) la = lb = 0;
    memcpy(buf, a, la);
    buf[la] = '/';
    memcpy(buf + la + 1, b, lb + 1);
    return buf;
}
/* A fresh directory under build/trainer_<pid>/. */
static const char *dir(char *buf, const char *name) {
    char cmd[700];
    snprintf(buf, 512, "%s/%s", g_dir, name);
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", buf);
    if (system(cmd) != 0) return buf;
    mkdir(buf, 0755);
    return buf;
}
static int same_file(const char *a, const char *b) {
    long la, lb;
    char *x = slurp(a, &la), *y = slurp(b, &lb);
    int same = x && y && la == lb && memcmp(x, y, (size_t)la) == 0;
    free(x);
    free(y);
    return same;
}
static void sleep_s(double s) {
    struct timespec t;
    t.tv_sec = (time_t)s;
    t.tv_nsec = (long)((s - (double)t.tv_sec) * 1e9);
    nanosleep(&t, NULL);
}
static int wait_file(const char *path, double seconds) {
    double waited = 0;
    while (!exists(path) && waited < seconds) { sleep_s(0.005); waited += 0.005; }
    return exists(path);
}

/* ---- a checkpoint's fields (the documented format, version 2) ---- */
typedef struct ck_info {
    int64_t step, data_index, opt_steps, total_steps, skipped;
    long records_at, len; /* the tensor records: [records_at, len - 8) */
    char *bytes;
} ck_info;
static uint64_t le(const char *p, int n) {
    uint64_t v = 0;
    int i;
    for (i = n - 1; i >= 0; i--) v = (v << 8) | (unsigned char)p[i];
    return v;
}
static int ck_read(const char *path, ck_info *c) {
    long at;
    memset(c, 0, sizeof *c);
    c->bytes = slurp(path, &c->len);
    if (!c->bytes || c->len < 100 || le(c->bytes + 8, 4) != 2) return 0;
    at = 28 + (long)le(c->bytes + 24, 4);
    c->step = (int64_t)le(c->bytes + at, 8);
    c->data_index = (int64_t)le(c->bytes + at + 16, 8);
    c->opt_steps = (int64_t)le(c->bytes + at + 32, 8);
    c->total_steps = (int64_t)le(c->bytes + at + 44, 8);
    c->skipped = (int64_t)le(c->bytes + at + 52, 8);
    c->records_at = at + 64 + 8 * (long)le(c->bytes + at + 60, 4);
    return c->records_at < c->len;
}

/* Every weight and buffer of a checkpoint is finite. */
static int ck_finite(const char *path) {
    moe_ctx *ctx = NULL;
    moe_config cfg;
    moe_model *m = NULL;
    int ok = moe_ctx_new(&ctx) == MOE_OK && moe_ckpt_config(ctx, path, &cfg) == MOE_OK && moe_model_new(ctx, &cfg, 1, &m) == MOE_OK &&
             moe_ckpt_load(ctx, path, m, NULL, NULL) == MOE_OK;
    int64_t i, j;
    for (i = 0; ok && i < moe_model_tensor_count(m); i++) {
        moe_tensor *t = moe_model_tensor(m, i, NULL, NULL);
        for (j = 0; j < t->numel; j++)
            if (!isfinite(moe_tensor_get(t, j))) { ok = 0; break; }
    }
    moe_model_free(ctx, m);
    moe_ctx_free(ctx);
    return ok;
}

/* The data rows of log.csv: their first fields into steps[] (at most cap), the skipped flags
   counted; -1 when a row is torn or has not 12 fields. */
static long log_rows(const char *path, long *steps, long cap, long *skipped) {
    FILE *f = fopen(path, "rb");
    char line[1024];
    long n = 0;
    *skipped = 0;
    if (!f || !fgets(line, sizeof line, f) || strncmp(line, "step,", 5) != 0) { if (f) fclose(f); return -1; }
    while (fgets(line, sizeof line, f)) {
        int commas = 0, field = 0;
        char *c, *tenth = NULL;
        for (c = line; *c; c++)
            if (*c == ',' && ++commas == 9) tenth = c + 1;
        (void)field;
        if (commas != 11 || line[strlen(line) - 1] != '\n') { fclose(f); return -1; }
        if (n < cap) steps[n] = atol(line);
        if (tenth && *tenth == '1') (*skipped)++;
        n++;
    }
    fclose(f);
    return n;
}

/* ---- the cases ---- */

/* The guard gives up (--max-skips 1) on the step after a checkpoint at step 11: what it saves
   must be that checkpoint with only the data position and the skipped count moved. */
static void guard_skip(const char *kind) {
    char d[512], p[512], q[512], log[512], fault[64], saved[512];
    ck_info a, b;
    int rc;
    snprintf(fault, sizeof fault, "%s@12", kind);
    dir(d, kind);
    pth(log, d, "out.log");
    /* no z-score skips before the fault, so that attempt 12 is step 12 */
    rc = run(log, TINY, SMALL, "--out", d, "--steps", "11", "--skip-window", "4", "--skip-loss-z", "0", "--skip-grad-z", "0", NULL);
    T_ASSERT(rc == 0, "the first 11 steps: status %d (see %s)", rc, log);
    pth(p, d, "ckpt-00000011.bin");
    pth(saved, d, "before.bin");
    T_ASSERT(rename(p, saved) == 0 && link(saved, p) == 0, "keeping a copy of %s", p);
    rc = run(log, TINY, SMALL, "--out", d, "--resume", "auto", "--steps", "12", "--max-skips", "1", "--skip-grad-z", "25", "--inject", fault, NULL);
    T_CHECK(rc == 3, "%s: status %d, want 3 (the guard gives up)", kind, rc);
    T_CHECK(has(log, "step 12 skipped") && has(log, "1 steps in a row skipped"), "%s: no skip message in %s", kind, log);
    T_ASSERT(ck_read(saved, &a) && ck_read(pth(q, d, "ckpt-00000011.bin"), &b), "%s: reading the checkpoints", kind);
    T_CHECK(b.step == a.step && b.opt_steps == a.opt_steps && b.skipped == a.skipped + 1 && b.data_index == a.data_index + 1,
            "%s: state after the skip: step %lld (was %lld), optimizer steps %lld (%lld), skipped %lld (%lld), data index %lld (%lld)",
            kind, (long long)b.step, (long long)a.step, (long long)b.opt_steps, (long long)a.opt_steps, (long long)b.skipped,
            (long long)a.skipped, (long long)b.data_index, (long long)a.data_index);
    T_CHECK(a.len == b.len && a.records_at == b.records_at &&
                memcmp(a.bytes + a.records_at, b.bytes + b.records_at, (size_t)(a.len - 8 - a.records_at)) == 0,
            "%s: weights, moments or expert biases changed in a skipped step", kind);
    free(a.bytes);
    free(b.bytes);
}
static void guard_nan_gradient_changes_nothing(void) { guard_skip("nan-grad"); }
static void guard_nan_loss_changes_nothing(void) { guard_skip("nan-loss"); }
static void guard_gradient_spike_changes_nothing(void) { guard_skip("spike"); }

static void guard_counts_skips_and_goes_on(void) {
    char d[512], log[512], p[512];
    long steps[64], skipped = 0, n;
    int rc;
    dir(d, "counts");
    pth(log, d, "out.log");
    rc = run(log, TINY, SMALL, "--out", d, "--steps", "20", "--inject", "nan-grad@5,nan-loss@9", NULL);
    T_ASSERT(rc == 0, "status %d (see %s)", rc, log);
    T_CHECK(has(log, "\"skipped\":2,"), "the JSON line does not count 2 skipped steps (see %s)", log);
    n = log_rows(pth(p, d, "log.csv"), steps, 64, &skipped);
    T_CHECK(n == 22 && skipped == 2, "log.csv: %ld rows with %ld skipped, want 22 with 2", n, skipped);
    T_CHECK(n == 22 && steps[4] == 5 && steps[5] == 5 && steps[8] == 8 && steps[9] == 8 && steps[21] == 20,
            "log.csv: a skipped attempt is logged under the step it tried");
    T_CHECK(ck_finite(pth(p, d, "ckpt-00000020.bin")), "the final weights are not all finite: a NaN got through");
}

static void guard_stops_after_max_skips(void) {
    char d[512], log[512], p[512];
    ck_info c;
    int rc;
    dir(d, "stops");
    pth(log, d, "out.log");
    rc = run(log, TINY, SMALL, "--out", d, "--steps", "20", "--max-skips", "4", "--inject", "nan-grad@3-30", NULL);
    T_CHECK(rc == 3, "status %d, want 3", rc);
    T_CHECK(has(log, "4 steps in a row skipped") && has(log, "ckpt-00000002.bin"), "no stop message naming the saved state (see %s)", log);
    T_ASSERT(ck_read(pth(p, d, "ckpt-00000002.bin"), &c), "no checkpoint of the last good step");
    T_CHECK(c.step == 2 && c.skipped == 4 && c.opt_steps == 2, "saved state: step %lld, skipped %lld, optimizer steps %lld", (long long)c.step,
            (long long)c.skipped, (long long)c.opt_steps);
    free(c.bytes);
}

/* SIGTERM, then --resume auto with no other settings: the checkpoint's settings and schedule
   length are used and the result is bit-identical; junk in log.csv and stale temporaries go. */
static void sigterm_then_resume_auto_identical(void) {
    char ref[512], d[512], log[512], p[512], q[512], tmp1[600], tmp2[600];
    long steps[128], skipped = 0, n, i;
    pid_t pid, dead;
    int rc, ok = 1;
    FILE *f;
    dir(ref, "sigterm_ref");
    dir(d, "sigterm");
    pth(log, d, "out.log");
    rc = run(pth(p, ref, "out.log"), TINY, SMALL, "--out", ref, "--steps", "40", "--lr", "2e-3", "--batch", "3", "--warmup", "7",
             "--save-every", "5", "--threads", "1", NULL);
    T_ASSERT(rc == 0, "the reference: status %d", rc);
    pid = spawn(log, TINY, SMALL, "--out", d, "--steps", "40", "--lr", "2e-3", "--batch", "3", "--warmup", "7", "--save-every", "5",
                "--threads", "2", NULL);
    T_ASSERT(wait_file(pth(p, d, "ckpt-00000010.bin"), 300), "no checkpoint at step 10");
    kill(pid, SIGTERM);
    rc = wait_status(pid);
    T_ASSERT(rc == 75 || rc == 0, "after SIGTERM: status %d, want 75", rc);
    if (rc == 0) { T_NOTE("the run finished before SIGTERM arrived: nothing to resume"); return; }
    T_CHECK(has(log, "interrupted by SIGTERM after step"), "no message after SIGTERM (see %s)", log);
    /* what a kill -9 would leave: rows after the checkpoint (one torn) and temporaries */
    f = fopen(pth(p, d, "log.csv"), "ab");
    T_ASSERT(f, "log.csv");
    fputs("999,0.001,1,1,1,1,1,1,1,0,,\n1000,0.0", f);
    fclose(f);
    dead = fork();
    if (dead == 0) _exit(0);
    waitpid(dead, NULL, 0);
    snprintf(tmp1, sizeof tmp1, "%s/ckpt-00000099.bin.tmp%ld", d, (long)dead);
    snprintf(tmp2, sizeof tmp2, "%s/log.csv.tmp%ld", d, (long)dead);
    f = fopen(tmp1, "wb"); if (f) { fputs("partial", f); fclose(f); }
    f = fopen(tmp2, "wb"); if (f) { fputs("partial", f); fclose(f); }
    rc = run(log, TINY, "--data", g_data, "--out", d, "--resume", "auto", "--sample", "0", "--seconds", "0", "--threads", "1", NULL);
    T_ASSERT(rc == 0, "the resumed run: status %d (see %s)", rc, log);
    T_CHECK(has(log, "resumed from") && has(log, "of 40"), "the resumed run did not take the schedule's 40 steps from the checkpoint");
    T_CHECK(same_file(pth(p, ref, "ckpt-00000040.bin"), pth(q, d, "ckpt-00000040.bin")),
            "the resumed run's final checkpoint differs from the uninterrupted run's");
    T_CHECK(same_file(pth(p, d, "ckpt.bin"), pth(q, d, "ckpt-00000040.bin")), "ckpt.bin is not the newest checkpoint");
    T_CHECK(!exists(tmp1) && !exists(tmp2), "stale temporaries are left: %s %s", exists(tmp1) ? tmp1 : "", exists(tmp2) ? tmp2 : "");
    n = log_rows(pth(p, d, "log.csv"), steps, 128, &skipped);
    for (i = 0; i < n && i < 128; i++) ok = ok && steps[i] == i + 1;
    T_CHECK(n == 40 && ok, "log.csv: %ld rows, want steps 1..40 once each (no junk, no torn row)", n);
}

static void resume_auto_skips_corrupt_checkpoint(void) {
    char ref[512], d[512], log[512], p[512], q[512];
    char *b;
    long len;
    int rc;
    FILE *f;
    dir(ref, "corrupt_ref");
    dir(d, "corrupt");
    pth(log, d, "out.log");
    rc = run(pth(p, ref, "out.log"), TINY, SMALL, "--out", ref, "--steps", "25", "--save-every", "5", NULL);
    T_ASSERT(rc == 0, "reference: status %d", rc);
    rc = run(log, TINY, SMALL, "--out", d, "--steps", "25", "--save-every", "5", "--keep", "0", NULL);
    T_ASSERT(rc == 0, "status %d", rc);
    /* make the newest two unusable (corrupt and cut), remove the final ones and resume */
    b = slurp(pth(p, d, "ckpt-00000020.bin"), &len);
    T_ASSERT(b && len > 1000, "read ckpt-00000020.bin");
    b[len / 2] ^= 0x10;
    f = fopen(p, "wb");
    T_ASSERT(f && fwrite(b, 1, (size_t)len, f) == (size_t)len, "write");
    fclose(f);
    f = fopen(pth(p, d, "ckpt-00000025.bin"), "wb");
    T_ASSERT(f && fwrite(b, 1, (size_t)len / 3, f) == (size_t)len / 3, "write");
    fclose(f);
    free(b);
    rc = run(log, TINY, SMALL, "--out", d, "--resume", "auto", NULL);
    T_ASSERT(rc == 0, "resume: status %d (see %s)", rc, log);
    T_CHECK(has(log, "ckpt-00000020.bin' fails its checksum") && has(log, "ckpt-00000025.bin' is truncated"),
            "no message naming the corrupt checkpoints (see %s)", log);
    T_CHECK(has(log, "resumed from ") && has(log, "ckpt-00000015.bin at step 15"), "did not resume from step 15 (see %s)", log);
    T_CHECK(same_file(pth(p, ref, "ckpt-00000025.bin"), pth(q, d, "ckpt-00000025.bin")), "the final checkpoint differs from the reference");
}

static void fresh_run_removes_old_checkpoints_hf_named_by_step(void) {
    char d[512], log[512], p[512], q[512], target[64];
    ssize_t n;
    int rc;
    dir(d, "fresh");
    pth(log, d, "out.log");
    rc = run(log, TINY, SMALL, "--out", d, "--steps", "20", "--save-every", "5", NULL);
    T_ASSERT(rc == 0, "status %d", rc);
    T_CHECK(exists(pth(p, d, "hf-00000020/config.json")) && exists(pth(q, d, "hf-00000020/model.safetensors")),
            "no Hugging Face export hf-00000020/");
    rc = run(log, TINY, SMALL, "--out", d, "--steps", "10", "--save-every", "5", NULL);
    T_ASSERT(rc == 0, "status %d", rc);
    T_CHECK(has(log, "a fresh run: removed 3 checkpoints of an earlier run"), "no message about the earlier run's checkpoints (see %s)", log);
    T_CHECK(!exists(pth(p, d, "ckpt-00000020.bin")) && !exists(pth(q, d, "ckpt-00000015.bin")) && exists(pth(p, d, "ckpt-00000010.bin")),
            "the earlier run's checkpoints are still there (or this run's are not)");
    n = readlink(pth(p, d, "hf"), target, sizeof target - 1);
    if (n > 0) target[n] = 0;
    T_CHECK(n > 0 && strcmp(target, "hf-00000010") == 0, "OUT/hf does not link to hf-00000010");
    T_CHECK(exists(pth(p, d, "hf/model.safetensors")), "OUT/hf/model.safetensors is not there");
    T_CHECK(same_file(pth(p, d, "ckpt.bin"), pth(q, d, "ckpt-00000010.bin")), "ckpt.bin is not the final checkpoint");
}

/* --ep-fp8 without expert parallelism or FP8 training: refused (status 2) with a message, before
   any training. */
static void ep_fp8_needs_ep_and_fp8(void) {
    char d[512], log[512];
    int rc;
    dir(d, "epfp8");
    pth(log, d, "out.log");
    rc = run(log, TINY, SMALL, "--out", d, "--steps", "2", "--ep-fp8", "1", NULL);
    T_CHECK(rc == 2 && has(log, "--ep-fp8 wants --ep N (N > 1) and --precision fp8"), "--ep-fp8 alone: status %d, want 2 with a message",
            rc);
}

static void short_validation_text_gives_null(void) {
    char d[512], log[512], *out, *json;
    int rc;
    dir(d, "shortval");
    pth(log, d, "out.log");
    rc = run(log, TINY, "--data", g_tiny_data, "--out", d, "--steps", "3", "--val-every", "1", "--sample", "0", "--seconds", "0", "--batch",
             "2", "--seq", "32", NULL);
    T_ASSERT(rc == 0, "status %d: the run was thrown away (see %s)", rc, log);
    out = slurp(log, NULL);
    T_ASSERT(out, "read %s", log);
    json = strstr(out, "{\"job\":\"train_tiny\"");
    T_CHECK(json && strstr(json, "\"val_bpb\":null,\"val_bpb_reason\":\"the validation text"), "no null val_bpb with a reason: %.300s",
            json ? json : out);
    T_CHECK(json && !strstr(json, "nan") && !strstr(json, "inf"), "the JSON line holds a non-number: %.300s", json ? json : "");
    T_CHECK(strstr(out, "validation estimate skipped"), "no message about the skipped validation estimates");
    free(out);
}

/* distill: SIGTERM in the teacher's and in the scratch student's training, --resume auto, the
   uninterrupted result; other flags refused; the guard counts skipped steps of all trainings. */
static void distill_resume_identical_and_guard(void) {
    char ref[512], d[512], g[512], log[512], p[512], q[512];
    static const char *const files[] = {"teacher-00000012.bin", "scratch-00000012.bin", "distilled-00000012.bin", "teacher.ckpt"};
    const char *marks[2] = {"teacher-00000004.bin", "scratch-00000008.bin"};
    int rc, k, kills = 0;
    size_t i;
#define DSMALL "--data", g_data, "--teacher-steps", "12", "--steps", "12", "--batch", "4", "--seq", "32", "--val-batches", "1", \
               "--save-every", "4", "--save-every-seconds", "0"
    dir(ref, "distill_ref");
    dir(d, "distill");
    dir(g, "distill_guard");
    pth(log, d, "out.log");
    rc = run(pth(p, ref, "out.log"), DISTILL, DSMALL, "--out", ref, NULL);
    T_ASSERT(rc == 0, "reference: status %d", rc);
    for (k = 0; k < 2; k++) {
        pid_t pid = spawn(log, DISTILL, DSMALL, "--out", d, "--resume", "auto", NULL);
        T_ASSERT(wait_file(pth(p, d, marks[k]), 300), "no %s", marks[k]);
        kill(pid, SIGTERM);
        rc = wait_status(pid);
        T_CHECK(rc == 75 || rc == 0, "after SIGTERM: status %d, want 75", rc);
        kills += rc == 75;
    }
    rc = run(log, DISTILL, DSMALL, "--out", d, "--resume", "auto", NULL);
    T_ASSERT(rc == 0, "resumed: status %d (see %s)", rc, log);
    T_NOTE("%d of 2 SIGTERMs interrupted a training", kills);
    T_CHECK(kills == 0 || has(log, "resumed from"), "no resume message (see %s)", log);
    for (i = 0; i < sizeof files / sizeof files[0]; i++)
        T_CHECK(same_file(pth(p, ref, files[i]), pth(q, d, files[i])), "%s differs from the uninterrupted run's", files[i]);
    rc = run(log, DISTILL, DSMALL, "--out", d, "--resume", "auto", "--lr", "1e-3", NULL);
    T_CHECK(rc == 2 && has(log, "was written with other flags"), "a resume with another --lr: status %d, want 2 with a message", rc);
    rc = run(pth(p, g, "out.log"), DISTILL, DSMALL, "--out", g, "--inject", "nan-grad@4,nan-loss@7", NULL);
    T_CHECK(rc == 0, "with faults: status %d", rc);
    T_CHECK(has(p, "\"skipped\":6,"), "the JSON line does not count 2 skipped steps in each of the 3 trainings (see %s)", p);
#undef DSMALL
}

int main(int argc, char **argv) {
    FILE *src, *dst;
    char buf[65536];
    size_t n, total = 0;
    t_filter = argc > 1 ? argv[1] : NULL;
    snprintf(g_dir, sizeof g_dir, "build/trainer_%ld", (long)getpid());
    snprintf(g_data, sizeof g_data, "%s/corpus.txt", g_dir);
    snprintf(g_tiny_data, sizeof g_tiny_data, "%s/tiny.txt", g_dir);
    mkdir("build", 0755);
    mkdir(g_dir, 0755);
    src = fopen("data/austen.txt", "rb");
    dst = fopen(g_data, "wb");
    if (!src || !dst || !exists(TINY) || !exists(DISTILL)) {
        fprintf(stderr, "test_trainer: needs data/austen.txt, %s and %s (./build.sh test trainer)\n", TINY, DISTILL);
        return 1;
    }
    while (total < 65536 && (n = fread(buf, 1, sizeof buf, src)) > 0) total += fwrite(buf, 1, n, dst);
    fclose(dst);
    /* 300 bytes: a validation part of 30 bytes, shorter than one 32-byte sequence */
    dst = fopen(g_tiny_data, "wb");
    fseek(src, 0, SEEK_SET);
    n = fread(buf, 1, 300, src);
    if (!dst || fwrite(buf, 1, n, dst) != 300) return 1;
    fclose(dst);
    fclose(src);
    T_RUN_FILTERED(guard_nan_gradient_changes_nothing);
    T_RUN_FILTERED(guard_nan_loss_changes_nothing);
    T_RUN_FILTERED(guard_gradient_spike_changes_nothing);
    T_RUN_FILTERED(guard_counts_skips_and_goes_on);
    T_RUN_FILTERED(guard_stops_after_max_skips);
    T_RUN_FILTERED(sigterm_then_resume_auto_identical);
    T_RUN_FILTERED(resume_auto_skips_corrupt_checkpoint);
    T_RUN_FILTERED(fresh_run_removes_old_checkpoints_hf_named_by_step);
    T_RUN_FILTERED(short_validation_text_gives_null);
    T_RUN_FILTERED(ep_fp8_needs_ep_and_fp8);
    T_RUN_FILTERED(distill_resume_identical_and_guard);
    if (t_failed == 0 && !getenv("MOE_TRAINER_KEEP")) {
        snprintf(buf, sizeof buf, "rm -rf '%s'", g_dir);
        if (system(buf) != 0) fprintf(stderr, "test_trainer: could not remove %s\n", g_dir);
    }
    return t_summary();
}
