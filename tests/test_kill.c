/* tests/test_kill.c — kill -9 a training run again and again; the resumed result is the same.

   build/train_tiny trains the tiny config for --steps N steps on a small corpus, checkpointing
   every 5 steps. A reference run goes straight through (1 thread). Then the same run is started
   with --resume auto and killed with SIGKILL, again and again: at random moments, and, every
   third kill, the moment a checkpoint's temporary file appears (while it is being written).
   Runs alternate between 1 and 2 threads. After --kills kills one last run finishes, and its
   final checkpoint must equal the reference's byte for byte (cmp), log.csv must hold each step
   exactly once, and no temporary file may be left.

       build/test_kill                      # the suite: 6 kills, 60 steps (./build.sh test kill)
       build/test_kill --kills 20 --steps 200 --json   # ./build.sh torture: JSON as the last line
       build/test_kill --seed S             # repeat the kill points of a run (its seed is printed)

   Needs build/train_tiny and a POSIX system. */
#define _XOPEN_SOURCE 700
#include "test.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long g_kills = 6, g_steps = 60;
static int g_json;
static unsigned long long g_seed, g_seed0; /* the xorshift state, and the seed it began with */
static const char *g_trainer = "build/train_tiny";
static char g_dir[256], g_data[300], g_ref[300], g_run[300];

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}
static void sleep_s(double s) {
    struct timespec t;
    t.tv_sec = (time_t)s;
    t.tv_nsec = (long)((s - (double)t.tv_sec) * 1e9);
    nanosleep(&t, NULL);
}
/* xorshift64*: the kill points */
static double uniform(void) {
    g_seed ^= g_seed >> 12;
    g_seed ^= g_seed << 25;
    g_seed ^= g_seed >> 27;
    return (double)((g_seed * 0x2545F4914F6CDD1Dull) >> 11) / 9007199254740992.0;
}

/* Start the trainer on OUT (stdout and stderr to LOG). */
static pid_t start(const char *out, int threads, int resume, const char *log) {
    char steps[32], th[16];
    pid_t pid;
    snprintf(steps, sizeof steps, "%ld", g_steps);
    snprintf(th, sizeof th, "%d", threads);
    fflush(stdout);
    pid = fork();
    if (pid == 0) {
        int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0644);
        const char *argv[40];
        int n = 0;
        if (fd >= 0) { dup2(fd, 1); dup2(fd, 2); close(fd); }
        argv[n++] = g_trainer;
        argv[n++] = "--data"; argv[n++] = g_data;
        argv[n++] = "--out"; argv[n++] = out;
        argv[n++] = "--steps"; argv[n++] = steps;
        argv[n++] = "--threads"; argv[n++] = th;
        if (resume) { argv[n++] = "--resume"; argv[n++] = "auto"; }
        argv[n++] = "--batch"; argv[n++] = "4";
        argv[n++] = "--seq"; argv[n++] = "32";
        argv[n++] = "--lr"; argv[n++] = "2e-3";
        argv[n++] = "--warmup"; argv[n++] = "10";
        argv[n++] = "--save-every"; argv[n++] = "5";
        argv[n++] = "--save-every-seconds"; argv[n++] = "0";
        argv[n++] = "--keep"; argv[n++] = "2";
        argv[n++] = "--val-every"; argv[n++] = "25";
        argv[n++] = "--sample"; argv[n++] = "0";
        argv[n++] = "--seconds"; argv[n++] = "0";
        argv[n] = NULL;
        execv(g_trainer, (char *const *)argv);
        _exit(127);
    }
    return pid;
}

/* A checkpoint temporary (ckpt-*.bin.tmp<pid>) in dir? */
static int tmp_present(const char *dir, char *name, size_t cap) {
    DIR *d = opendir(dir);
    struct dirent *e;
    int found = 0;
    if (!d) return 0;
    while ((e = readdir(d)) != NULL)
        if (strncmp(e->d_name, "ckpt-", 5) == 0 && strstr(e->d_name, ".bin.tmp")) {
            snprintf(name, cap, "%s/%s", dir, e->d_name);
            found = 1;
            break;
        }
    closedir(d);
    return found;
}
/* The newest checkpoint step in dir (0: none). */
static long latest_step(const char *dir) {
    DIR *d = opendir(dir);
    struct dirent *e;
    long best = 0;
    if (!d) return 0;
    while ((e = readdir(d)) != NULL)
        if (strncmp(e->d_name, "ckpt-", 5) == 0 && !strstr(e->d_name, ".tmp") && atol(e->d_name + 5) > best) best = atol(e->d_name + 5);
    closedir(d);
    return best;
}
static int any_tmp(const char *dir) {
    DIR *d = opendir(dir);
    struct dirent *e;
    int found = 0;
    if (!d) return 0;
    while ((e = readdir(d)) != NULL)
        if (strstr(e->d_name, ".tmp")) found = 1;
    closedir(d);
    return found;
}
/* Wait for pid; 1 when it exited with status 0. */
static int wait_ok(pid_t pid, int *status) {
    int st = 0;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {}
    if (status) *status = st;
    return WIFEXITED(st) && WEXITSTATUS(st) == 0;
}

static int g_done, g_identical = 1, g_resumed, g_from_ckpt, g_mid_write, g_killed, g_rounds;
static double g_seconds, g_ref_seconds;

/* cmp the final checkpoint of the run directory with the reference's. */
static int final_identical(const char *ref_out) {
    char cmd[1000];
    int same;
    snprintf(cmd, sizeof cmd, "cmp '%s/ckpt-%08ld.bin' '%s/ckpt-%08ld.bin'", ref_out, g_steps, g_run, g_steps);
    same = system(cmd) == 0;
    T_CHECK(same, "the final checkpoints differ: %s", cmd);
    g_rounds++;
    return same;
}

static void kill9_resume_identical(void) {
    char ref_out[300], log[400], tmpname[600];
    double t0 = now_s(), t_ref;
    int st, i, threads = 2, after_kill = 0;
    pid_t pid;
    snprintf(ref_out, sizeof ref_out, "%s/ref", g_dir);
    snprintf(log, sizeof log, "%s/ref.log", g_dir);
    /* the uninterrupted reference */
    t_ref = now_s();
    pid = start(ref_out, 1, 0, log);
    T_ASSERT(pid > 0 && wait_ok(pid, &st), "the reference run failed (status %d): see %s", st, log);
    t_ref = now_s() - t_ref;
    g_ref_seconds = t_ref;
    T_NOTE("reference: %ld steps in %.1f s (1 thread); seed of the kill points %llu", g_steps, t_ref, g_seed0);
    /* the same command with --resume auto, killed again and again. A kill waits for k more
       checkpoints (k random, so that the kills spread over the steps left), then either a
       random share of the time between two checkpoints, or the next checkpoint's temporary
       file (a kill while it is written). The first kill comes at a random moment of the start. */
    snprintf(log, sizeof log, "%s/runs.log", g_dir);
    for (i = 0; g_killed < g_kills; i++) {
        int mid_write = g_killed % 3 == 2, killed = 0;
        long base = latest_step(g_run), seen = base, k;
        long kmax = (g_steps - base) / 5 / (g_kills - g_killed + 1);
        double t_start = now_s(), t_seen = t_start, interval = t_ref / (double)(g_steps / 5 + 1), delay = -1;
        FILE *f;
        k = g_killed == 0 ? 0 : 1 + (long)(uniform() * (double)(kmax > 1 ? kmax : 1));
        if (k == 0) delay = uniform() * interval;
        f = fopen(log, "ab");
        if (f) {
            fprintf(f, "=== run %d %s(%d threads, kill %s)\n", i, after_kill ? "after a kill " : "", threads,
                    k == 0 ? "at a random moment of the start" : mid_write ? "while a checkpoint is written" : "at a random time");
            fclose(f);
        }
        pid = start(g_run, threads, 1, log);
        T_ASSERT(pid > 0, "fork failed");
        for (;;) {
            long now_step;
            if (waitpid(pid, &st, WNOHANG) == pid) break; /* it finished (or failed) before the kill */
            now_step = latest_step(g_run);
            if (now_step != seen) { /* a checkpoint appeared: measure the interval */
                if (seen > base) interval = now_s() - t_seen;
                seen = now_step;
                t_seen = now_s();
                if (!mid_write && now_step >= base + 5 * k && delay < 0) delay = now_s() - t_start + uniform() * interval;
            }
            if ((delay >= 0 && now_s() - t_start >= delay) ||
                (mid_write && seen >= base + 5 * k && tmp_present(g_run, tmpname, sizeof tmpname))) {
                kill(pid, SIGKILL);
                while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {}
                killed = 1;
                break;
            }
            sleep_s(mid_write && seen >= base + 5 * k ? 0.0001 : 0.001);
        }
        threads = 3 - threads;
        if (!killed) { /* it ran to the end first: compare, and start a new round */
            char cmd[400];
            T_ASSERT(WIFEXITED(st) && WEXITSTATUS(st) == 0, "run %d exited with status %d: see %s", i,
                     WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st), log);
            g_identical &= final_identical(ref_out);
            snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_run);
            T_ASSERT(system(cmd) == 0, "%s", cmd);
            after_kill = 0;
            continue;
        }
        g_killed++;
        after_kill = 1;
        if (mid_write && access(tmpname, F_OK) == 0) g_mid_write++; /* the temporary was still there: killed mid-write */
    }
    {
        FILE *f = fopen(log, "ab");
        if (f) { fprintf(f, "=== last run after a kill (%d threads)\n", threads); fclose(f); }
    }
    pid = start(g_run, threads, 1, log);
    T_ASSERT(pid > 0 && wait_ok(pid, &st), "the last run failed (status %d): see %s", st, log);
    g_done = 1;
    g_identical &= final_identical(ref_out);
    /* every run after a kill began where the newest checkpoint (or step 0) left it */
    {
        FILE *f = fopen(log, "rb");
        char line[2048];
        int counting = 0;
        while (f && fgets(line, sizeof line, f)) {
            if (strncmp(line, "=== ", 4) == 0) { counting = strstr(line, " after a kill ") != NULL; continue; }
            if (!counting) continue;
            if (strstr(line, "resumed from ")) { g_resumed++; g_from_ckpt++; counting = 0; }
            else if (strstr(line, "no checkpoint in")) { g_resumed++; counting = 0; }
        }
        if (f) fclose(f);
    }
    T_CHECK(g_resumed == g_killed, "%d of %d runs after a kill resumed (see %s)", g_resumed, g_killed, log);
    T_CHECK(g_mid_write >= (int)(g_kills / 3), "only %d of the kills hit a checkpoint being written", g_mid_write);
    g_seconds = now_s() - t0;
    T_NOTE("%d kills (%d while a checkpoint was being written), %d resumed (%d from a checkpoint), %d round%s, final checkpoint %s; %.1f s",
           g_killed, g_mid_write, g_resumed, g_from_ckpt, g_rounds, g_rounds > 1 ? "s" : "", g_identical ? "identical (cmp)" : "DIFFERENT",
           g_seconds);
}

/* No temporary file is left behind (each run removes those of killed runs). */
static void no_stale_temporaries(void) {
    T_ASSERT(g_done, "the kill run did not finish");
    T_CHECK(!any_tmp(g_run), "a *.tmp* file is left in %s", g_run);
}

/* log.csv holds the header and steps 1..N exactly once each, every row complete. */
static void log_rows_exactly_once(void) {
    char path[400], line[1024];
    FILE *f;
    long expect = 1, rows = 0;
    int bad = 0;
    T_ASSERT(g_done, "the kill run did not finish");
    snprintf(path, sizeof path, "%s/log.csv", g_run);
    f = fopen(path, "rb");
    T_ASSERT(f, "no %s", path);
    T_ASSERT(fgets(line, sizeof line, f) && strncmp(line, "step,", 5) == 0, "no header in %s", path);
    while (fgets(line, sizeof line, f)) {
        int commas = 0;
        char *c;
        for (c = line; *c; c++) commas += *c == ',';
        if (atol(line) != expect || commas != 11 || line[strlen(line) - 1] != '\n') {
            if (bad++ < 3) T_CHECK(0, "row %ld: \"%.60s\" (want step %ld, 12 fields)", rows + 1, line, expect);
        }
        expect++;
        rows++;
    }
    fclose(f);
    T_CHECK(rows == g_steps && !bad, "%ld rows, want %ld", rows, g_steps);
}

int main(int argc, char **argv) {
    int i;
    FILE *src, *dst;
    char buf[65536];
    size_t n, total = 0;
    g_seed = (unsigned long long)time(NULL) * 2654435761ull ^ (unsigned long long)getpid();
    for (i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--kills") == 0 && i + 1 < argc) g_kills = atol(argv[++i]);
        else if (strcmp(argv[i], "--steps") == 0 && i + 1 < argc) g_steps = atol(argv[++i]);
        else if (strcmp(argv[i], "--seed") == 0 && i + 1 < argc) g_seed = strtoull(argv[++i], NULL, 10);
        else if (strcmp(argv[i], "--trainer") == 0 && i + 1 < argc) g_trainer = argv[++i];
        else if (strcmp(argv[i], "--json") == 0) g_json = 1;
        else { fprintf(stderr, "usage: test_kill [--kills K] [--steps N] [--seed S] [--trainer PATH] [--json]\n"); return 2; }
    }
    g_seed0 = g_seed;
    if (g_kills < 1 || g_steps < 10 || !g_seed) { fprintf(stderr, "test_kill: need --kills >= 1, --steps >= 10, --seed > 0\n"); return 2; }
    snprintf(g_dir, sizeof g_dir, "build/kill_%ld", (long)getpid());
    snprintf(g_data, sizeof g_data, "%s/corpus.txt", g_dir);
    snprintf(g_ref, sizeof g_ref, "%s/ref", g_dir);
    snprintf(g_run, sizeof g_run, "%s/run", g_dir);
    mkdir("build", 0755);
    mkdir(g_dir, 0755);
    /* 64 kB of the bundled corpus: the closing validation pass stays short */
    src = fopen("data/austen.txt", "rb");
    dst = fopen(g_data, "wb");
    if (!src || !dst) { fprintf(stderr, "test_kill: need data/austen.txt (run from the repository root after ./build.sh)\n"); return 1; }
    while (total < 65536 && (n = fread(buf, 1, sizeof buf, src)) > 0) total += fwrite(buf, 1, n, dst);
    fclose(src);
    fclose(dst);
    printf("kill test: %ld kills over %ld steps in %s (seed %llu)\n", g_kills, g_steps, g_dir, g_seed0);
    T_RUN(kill9_resume_identical);
    T_RUN(no_stale_temporaries);
    T_RUN(log_rows_exactly_once);
    if (t_failed == 0 && !getenv("MOE_KILL_KEEP")) { /* keep the evidence of a failure, not of a success */
        snprintf(buf, sizeof buf, "rm -rf '%s'", g_dir);
        if (system(buf) != 0) fprintf(stderr, "test_kill: could not remove %s\n", g_dir);
    }
    i = t_summary();
    if (g_json)
        printf("{\"job\":\"torture\",\"kills\":%d,\"resumed\":%d,\"identical\":%s,\"seconds\":%.1f,\"mid_write_kills\":%d,"
               "\"resumed_from_checkpoint\":%d,\"steps\":%ld,\"reference_seconds\":%.1f,\"seed\":%llu}\n",
               g_killed, g_resumed, g_identical ? "true" : "false", g_seconds, g_mid_write, g_from_ckpt, g_steps, g_ref_seconds, g_seed0);
    return i;
}
