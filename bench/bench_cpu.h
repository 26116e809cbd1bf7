/* bench/bench_cpu.h — which CPU a bench ran on, for its table and its JSON line.

   Figures from these benches are only comparable on one CPU, and the project's machines
   differ (AMD Zen 4 or Intel Xeon), so every bench names the CPU next to its numbers:
   "cpu" is the "model name" of /proc/cpuinfo, "cpu_id" its vendor, family and model (some
   machines report only "AMD EPYC"). Included by the bench programs after moe.h. */
#ifndef BENCH_CPU_H
#define BENCH_CPU_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct bench_cpu {
    char model[160];   /* "model name", or "unknown" */
    char vendor[32];   /* "vendor_id": GenuineIntel, AuthenticAMD */
    int family, model_id;
    char id[96];       /* "AuthenticAMD family 25 model 17" */
    char flags[4096];  /* the "flags" line, with a space before and after each flag */
} bench_cpu;

/* The value of a "key : value" line of /proc/cpuinfo, trimmed, if the line has that key. */
static inline const char *bench_cpuinfo_value(char *line, const char *key) {
    size_t n = strlen(key), len;
    char *v;
    if (strncmp(line, key, n) != 0 || (line[n] != ' ' && line[n] != '\t' && line[n] != ':')) return NULL;
    v = strchr(line, ':');
    if (!v) return NULL;
    v++;
    while (*v == ' ' || *v == '\t') v++;
    len = strlen(v);
    while (len > 0 && (v[len - 1] == '\n' || v[len - 1] == ' ' || v[len - 1] == '\r')) v[--len] = 0;
    return v;
}

/* Read the first processor's entry of /proc/cpuinfo. */
static inline void bench_cpu_read(bench_cpu *c) {
    static char line[8192];
    FILE *f = fopen("/proc/cpuinfo", "r");
    int got_model = 0;
    memset(c, 0, sizeof *c);
    strcpy(c->model, "unknown");
    strcpy(c->vendor, "unknown");
    c->family = c->model_id = -1;
    while (f && fgets(line, sizeof line, f)) {
        const char *v;
        if (line[0] == '\n' && got_model) break; /* end of the first processor's entry */
        if ((v = bench_cpuinfo_value(line, "model name"))) {
            snprintf(c->model, sizeof c->model, "%s", v);
            got_model = 1;
        } else if ((v = bench_cpuinfo_value(line, "vendor_id"))) {
            snprintf(c->vendor, sizeof c->vendor, "%s", v);
        } else if ((v = bench_cpuinfo_value(line, "cpu family"))) {
            c->family = (int)strtol(v, NULL, 10);
        } else if ((v = bench_cpuinfo_value(line, "model"))) {
            c->model_id = (int)strtol(v, NULL, 10);
        } else if ((v = bench_cpuinfo_value(line, "flags"))) {
            snprintf(c->flags, sizeof c->flags, " %s ", v);
        }
    }
    if (f) fclose(f);
    snprintf(c->id, sizeof c->id, "%s family %d model %d", c->vendor, c->family, c->model_id);
}

/* Does the CPU report this /proc/cpuinfo flag (e.g. "avx512f")? */
static inline int bench_cpu_has(const bench_cpu *c, const char *flag) {
    char pat[64];
    snprintf(pat, sizeof pat, " %s ", flag);
    return strstr(c->flags, pat) != NULL;
}

/* s as the inside of a JSON string (quotes, backslashes and control characters escaped). */
static inline const char *bench_json_escape(const char *s, char *out, size_t n) {
    size_t o = 0;
    for (; *s && o + 7 < n; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\') { out[o++] = '\\'; out[o++] = (char)ch; }
        else if (ch < 0x20) o += (size_t)snprintf(out + o, n - o, "\\u%04x", ch);
        else out[o++] = (char)ch;
    }
    out[o] = 0;
    return out;
}

/* The "cpu" and "cpu_id" members of a JSON object, without braces: "cpu":"…","cpu_id":"…" */
static inline const char *bench_cpu_json(const bench_cpu *c, char *out, size_t n) {
    char a[2 * sizeof c->model], b[2 * sizeof c->id];
    snprintf(out, n, "\"cpu\":\"%s\",\"cpu_id\":\"%s\"", bench_json_escape(c->model, a, sizeof a),
             bench_json_escape(c->id, b, sizeof b));
    return out;
}

#endif
