/* tests/fuzz/fuzz_common.h — what the libFuzzer targets and the seed generator share: the small
   model the file targets load into, a scratch directory, and the checks every call must pass.

   A target is fed bytes by libFuzzer and hands them to one parser through the public API (from
   memory where the API reads memory, else through a file in a scratch directory under
   /dev/shm). Whatever the bytes, the call must return (ASan, UBSan and LeakSanitizer watch
   it), and a refusal must leave a message in moe_ctx_error: fuzz_refused aborts otherwise,
   which libFuzzer reports as a crash. */
#ifndef MOE_FUZZ_COMMON_H
#define MOE_FUZZ_COMMON_H

#if !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L
#endif
#include "moe.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* Each target uses some of these helpers. */
#if defined(__GNUC__)
#define FUZZ_FN static __attribute__((unused))
#else
#define FUZZ_FN static
#endif

/* A small config with every structural feature (q and kv compression, a dense and a MoE
   layer, 4 experts in 2 groups, a shared expert, one MTP module): config seeds start here. */
FUZZ_FN moe_config fuzz_micro_config(void) {
    moe_config c = moe_config_tiny();
    c.vocab_size = 32; c.hidden_size = 16; c.intermediate_size = 32; c.moe_intermediate_size = 8;
    c.num_hidden_layers = 2; c.first_k_dense_replace = 1; c.num_attention_heads = 2;
    c.q_lora_rank = 8; c.kv_lora_rank = 8; c.qk_nope_head_dim = 4; c.qk_rope_head_dim = 4; c.v_head_dim = 4;
    c.n_routed_experts = 4; c.num_experts_per_tok = 2; c.n_group = 2; c.topk_group = 1;
    c.max_position_embeddings = 16;
    return c;
}
/* The model of the checkpoint and Hugging Face targets, smaller still: one MoE layer (2
   experts and a shared one, q compression), 23 tensors. A load costs about the size of the
   safetensors header, so fewer tensors mean proportionally more executions per second. */
FUZZ_FN moe_config fuzz_nano_config(void) {
    moe_config c = fuzz_micro_config();
    c.vocab_size = 8; c.hidden_size = 8; c.moe_intermediate_size = 4; c.num_hidden_layers = 1; c.first_k_dense_replace = 0;
    c.num_attention_heads = 1; c.q_lora_rank = 4; c.kv_lora_rank = 4; c.qk_nope_head_dim = 2; c.qk_rope_head_dim = 2;
    c.v_head_dim = 2; c.n_routed_experts = 2; c.num_experts_per_tok = 1; c.n_group = 1; c.topk_group = 1;
    c.num_nextn_predict_layers = 0; c.max_position_embeddings = 8;
    return c;
}
#define FUZZ_FP8_BLOCK 4 /* the FP8 block of the Hugging Face directories */

FUZZ_FN void fuzz_die(const char *what, moe_ctx *ctx) {
    fprintf(stderr, "fuzz: %s%s%s\n", what, ctx ? ": " : "", ctx ? moe_ctx_error(ctx) : "");
    abort();
}

/* A call that failed must say why. */
FUZZ_FN void fuzz_refused(moe_ctx *ctx, moe_status s, const char *fn) {
    const char *msg = moe_ctx_error(ctx);
    if (s == MOE_OK) return;
    if (!msg || !msg[0]) {
        fprintf(stderr, "fuzz: %s returned %s with an empty message\n", fn, moe_status_name(s));
        abort();
    }
}

/* ---- a scratch directory, removed at exit ---- */

static char g_fuzz_dir[256];
static const char *g_fuzz_files[8];
static int g_fuzz_nfiles;

FUZZ_FN void fuzz_cleanup(void) {
    char path[512];
    int i;
    for (i = 0; i < g_fuzz_nfiles; i++) {
        snprintf(path, sizeof path, "%s/%s", g_fuzz_dir, g_fuzz_files[i]);
        remove(path);
    }
    if (g_fuzz_dir[0]) rmdir(g_fuzz_dir);
}

/* Make <shm or tmp>/moe_fuzz_<name>_<pid>/; `files` lists what the caller will put there. */
FUZZ_FN const char *fuzz_scratch(const char *name, const char *const *files, int nfiles) {
    const char *base = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : (getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    int i;
    snprintf(g_fuzz_dir, sizeof g_fuzz_dir, "%s/moe_fuzz_%s_%ld", base, name, (long)getpid());
    if (mkdir(g_fuzz_dir, 0700) != 0) fuzz_die("cannot create the scratch directory", NULL);
    for (i = 0; i < nfiles && i < 8; i++) g_fuzz_files[g_fuzz_nfiles++] = files[i];
    atexit(fuzz_cleanup);
    return g_fuzz_dir;
}

FUZZ_FN void fuzz_write(const char *path, const void *data, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f || (n && fwrite(data, 1, n, f) != n)) fuzz_die("cannot write a scratch file", NULL);
    if (fclose(f) != 0) fuzz_die("cannot write a scratch file", NULL);
}

/* ---- Hugging Face directories of the nano model (seed 1) ---- */

/* config.json + model.safetensors of the nano model (F32, or FP8 blocks of FUZZ_FP8_BLOCK); with `shards`, the
   tensors also go, alternately, to model-0000{1,2}-of-00002.safetensors, and the index of that
   split is written to `index` (when not NULL). */
FUZZ_FN moe_status fuzz_hf_dir(moe_ctx *ctx, const char *dir, int fp8, int shards, char *index, size_t index_size) {
    moe_config c = fuzz_nano_config();
    moe_model *m = NULL;
    moe_hf_save_opts o;
    moe_st_file *f = NULL;
    moe_st_writer *w[2] = {NULL, NULL};
    char path[512];
    size_t at = 0;
    int64_t i;
    moe_status s;
    memset(&o, 0, sizeof o);
    o.fp8 = fp8;
    o.fp8_block = FUZZ_FP8_BLOCK;
    s = moe_model_new(ctx, &c, 1, &m);
    if (!s) s = moe_model_save_hf(ctx, m, dir, &o);
    moe_model_free(ctx, m);
    if (s || !shards) return s;
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    s = moe_st_open(ctx, path, &f);
    if (!s) s = moe_st_writer_new(ctx, &w[0]);
    if (!s) s = moe_st_writer_new(ctx, &w[1]);
    if (index) at += (size_t)snprintf(index + at, index_size - at, "{\"metadata\": {\"total_size\": %lld}, \"weight_map\": {",
                                      (long long)0);
    for (i = 0; !s && i < moe_st_count(f); i++) {
        const moe_st_tensor *t = moe_st_get(f, i);
        s = moe_st_writer_add(ctx, w[i % 2], t->name, t->dtype, t->ndim, t->shape, t->data);
        if (index && at < index_size)
            at += (size_t)snprintf(index + at, index_size - at, "%s\"%s\": \"model-0000%d-of-00002.safetensors\"", i ? ", " : "",
                                   t->name, (int)(i % 2) + 1);
    }
    if (index && at < index_size) snprintf(index + at, index_size - at, "}}\n");
    for (i = 0; !s && i < 2; i++) {
        snprintf(path, sizeof path, "%s/model-0000%d-of-00002.safetensors", dir, (int)i + 1);
        s = moe_st_writer_save(ctx, w[i], path);
    }
    moe_st_writer_free(w[0]);
    moe_st_writer_free(w[1]);
    moe_st_close(f);
    return s;
}

#endif /* MOE_FUZZ_COMMON_H */
