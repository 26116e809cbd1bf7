/* tests/fuzz/gen_corpus.c — writes the seed corpus of every fuzz target, made by moe.h's own
   writers (moe_config_save, moe_st_writer, moe_model_save_hf, moe_ckpt_save, the distillation
   cache writer) from a few configurations, and a dictionary of the JSON keys per target.

     gen_corpus OUT     → OUT/seeds/<target>/ (files), OUT/dict/<target>.dict

   build.sh fuzz and the fuzz test suite run it before the targets. */
#define _POSIX_C_SOURCE 200809L
#define MOE_IMPLEMENTATION
#include "moe.h"
#include "fuzz_common.h"

#include <errno.h>

static moe_ctx *g_ctx;
static char g_out[512];
static int g_count;

static void check(moe_status s, const char *what) {
    if (s != MOE_OK) {
        fprintf(stderr, "gen_corpus: %s: %s\n", what, moe_ctx_error(g_ctx));
        exit(1);
    }
}
static void mkdirs(const char *sub) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", g_out, sub);
    if (mkdir(path, 0755) != 0 && errno != EEXIST) {
        fprintf(stderr, "gen_corpus: cannot create %s\n", path);
        exit(1);
    }
}
static const char *seed_path(const char *target, const char *name) {
    static char path[1400];
    snprintf(path, sizeof path, "%s/seeds/%s/%s", g_out, target, name);
    return path;
}
static void *read_all(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    char *p;
    long len;
    if (!f || fseek(f, 0, SEEK_END) != 0 || (len = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) {
        fprintf(stderr, "gen_corpus: cannot read %s\n", path);
        exit(1);
    }
    p = (char *)malloc((size_t)len + 1);
    if (!p || fread(p, 1, (size_t)len, f) != (size_t)len) exit(1);
    fclose(f);
    p[len] = 0;
    *n = (size_t)len;
    return p;
}
static void seed(const char *target, const char *name, const void *data, size_t n) {
    fuzz_write(seed_path(target, name), data, n);
    g_count++;
}
static void copy_seed(const char *src, const char *target, const char *name) {
    size_t n;
    void *p = read_all(src, &n);
    seed(target, name, p, n);
    free(p);
}
static void dict(const char *target, const char *const *words, size_t n) {
    char path[1200];
    FILE *f;
    size_t i;
    snprintf(path, sizeof path, "%s/dict/%s.dict", g_out, target);
    f = fopen(path, "w");
    if (!f) exit(1);
    for (i = 0; i < n; i++) fprintf(f, "\"\\\"%s\\\"\"\n", words[i]); /* each word quoted, as a JSON string */
    fclose(f);
}

/* ---- config.json ---- */

static void config_seeds(void) {
    moe_config c[10];
    char name[64], buf[4096];
    int i, n = 0;
    c[n++] = moe_config_tiny();
    c[n++] = moe_config_small();
    c[n++] = fuzz_micro_config();
    c[n] = fuzz_micro_config(); /* YaRN, unequal mscale fields */
    c[n].rope_scaling.factor = 4; c[n].rope_scaling.original_max_pos = 4; c[n].rope_scaling.beta_fast = 32;
    c[n].rope_scaling.beta_slow = 1; c[n].rope_scaling.mscale = 1; c[n].rope_scaling.mscale_all_dim = 0.5;
    n++;
    c[n] = c[n - 1]; /* YaRN, mscale fields absent */
    c[n].rope_scaling.mscale = 0; c[n].rope_scaling.mscale_all_dim = 0;
    n++;
    c[n] = fuzz_micro_config(); /* rotate_half, V2-Lite style routing */
    c[n].rope_layout = MOE_ROPE_HALVES; c[n].q_lora_rank = 0; c[n].scoring_func = MOE_SCORING_SOFTMAX;
    c[n].topk_method = MOE_TOPK_GREEDY; c[n].norm_topk_prob = 0; c[n].tie_word_embeddings = 1; c[n].num_nextn_predict_layers = 0;
    n++;
    c[n] = fuzz_micro_config();
    c[n].topk_method = MOE_TOPK_GROUP_LIMITED_GREEDY; c[n].scoring_func = MOE_SCORING_SOFTMAX; c[n].n_shared_experts = 0;
    n++;
    c[n] = moe_config_tiny(); /* DeepSeek-V3's own numbers */
    c[n].vocab_size = 129280; c[n].hidden_size = 7168; c[n].intermediate_size = 18432; c[n].moe_intermediate_size = 2048;
    c[n].num_hidden_layers = 61; c[n].first_k_dense_replace = 3; c[n].num_attention_heads = 128; c[n].q_lora_rank = 1536;
    c[n].kv_lora_rank = 512; c[n].qk_nope_head_dim = 128; c[n].qk_rope_head_dim = 64; c[n].v_head_dim = 128;
    c[n].n_routed_experts = 256; c[n].num_experts_per_tok = 8; c[n].n_group = 8; c[n].topk_group = 4;
    c[n].max_position_embeddings = 163840; c[n].rope_scaling.factor = 40; c[n].rope_scaling.original_max_pos = 4096;
    c[n].rope_scaling.beta_fast = 32; c[n].rope_scaling.beta_slow = 1; c[n].rope_scaling.mscale = 1;
    c[n].rope_scaling.mscale_all_dim = 1;
    n++;
    for (i = 0; i < n; i++) {
        snprintf(name, sizeof name, "config_%d.json", i);
        check(moe_config_save(g_ctx, &c[i], seed_path("config", name)), "moe_config_save");
        g_count++;
    }
    /* transformers 5's form of seed 3: rope_parameters instead of rope_theta + rope_scaling */
    {
        const moe_config *y = &c[3];
        int len = snprintf(buf, sizeof buf,
                           "{\"vocab_size\": %lld, \"hidden_size\": %lld, \"intermediate_size\": %lld, \"moe_intermediate_size\": %lld,"
                           " \"first_k_dense_replace\": %lld, \"max_position_embeddings\": %lld, \"n_shared_experts\": %lld,"
                           " \"num_hidden_layers\": %lld, \"num_attention_heads\": %lld,"
                           " \"num_key_value_heads\": null, \"q_lora_rank\": %lld, \"kv_lora_rank\": %lld, \"qk_nope_head_dim\": %lld,"
                           " \"qk_rope_head_dim\": %lld, \"head_dim\": %lld, \"v_head_dim\": %lld, \"n_routed_experts\": %lld,"
                           " \"num_experts_per_tok\": %lld, \"n_group\": %lld, \"topk_group\": %lld, \"num_mtp_layers\": 1,"
                           " \"rope_interleave\": true, \"dtype\": \"float32\", \"rope_parameters\": {\"rope_type\": \"yarn\","
                           " \"rope_theta\": %.17g, \"factor\": %.17g, \"original_max_position_embeddings\": %lld, \"beta_fast\": %.17g,"
                           " \"beta_slow\": %.17g, \"mscale\": %.17g, \"mscale_all_dim\": %.17g, \"truncate\": true}}",
                           (long long)y->vocab_size, (long long)y->hidden_size, (long long)y->intermediate_size,
                           (long long)y->moe_intermediate_size, (long long)y->first_k_dense_replace,
                           (long long)y->max_position_embeddings, (long long)y->n_shared_experts, (long long)y->num_hidden_layers,
                           (long long)y->num_attention_heads, (long long)y->q_lora_rank, (long long)y->kv_lora_rank,
                           (long long)y->qk_nope_head_dim, (long long)y->qk_rope_head_dim, (long long)y->qk_rope_head_dim,
                           (long long)y->v_head_dim, (long long)y->n_routed_experts, (long long)y->num_experts_per_tok,
                           (long long)y->n_group, (long long)y->topk_group, y->rope_theta, y->rope_scaling.factor,
                           (long long)y->rope_scaling.original_max_pos, y->rope_scaling.beta_fast, y->rope_scaling.beta_slow,
                           y->rope_scaling.mscale, y->rope_scaling.mscale_all_dim);
        moe_config t;
        check(moe_config_parse(g_ctx, buf, (size_t)len, &t), "the transformers 5 seed");
        seed("config", "config_transformers5.json", buf, (size_t)len);
    }
    {
        static const char *const keys[] = {
            "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
            "first_k_dense_replace", "num_attention_heads", "num_key_value_heads", "q_lora_rank", "kv_lora_rank",
            "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "n_shared_experts",
            "num_experts_per_tok", "n_group", "topk_group", "topk_method", "scoring_func", "norm_topk_prob",
            "routed_scaling_factor", "num_nextn_predict_layers", "num_mtp_layers", "max_position_embeddings", "rope_theta",
            "rope_scaling", "rope_parameters", "rope_type", "type", "yarn", "default", "factor",
            "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor",
            "truncate", "partial_rotary_factor", "rope_interleave", "rms_norm_eps", "hidden_act", "silu", "attention_bias",
            "mlp_bias", "attention_dropout", "moe_layer_freq", "tie_word_embeddings", "initializer_range", "noaux_tc",
            "greedy", "group_limited_greedy", "sigmoid", "softmax", "head_dim", "qk_head_dim"};
        dict("config", keys, sizeof keys / sizeof keys[0]);
    }
}

/* ---- safetensors, and the Hugging Face directories ---- */

static void st_seeds(void) {
    char dir[1200], path[1400], index[16384];
    moe_st_writer *w;
    unsigned char bytes[64];
    int64_t sh[4];
    int i;
    snprintf(dir, sizeof dir, "%s/hf", g_out);
    mkdir(dir, 0755);
    /* the nano model in F32 (also cut into two shards, with their index) and in FP8 */
    check(fuzz_hf_dir(g_ctx, dir, 0, 1, index, sizeof index), "the F32 HF directory");
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    copy_seed(path, "safetensors", "nano_f32.safetensors");
    copy_seed(path, "hf_weights", "nano_f32.safetensors");
    snprintf(path, sizeof path, "%s/model-00002-of-00002.safetensors", dir);
    copy_seed(path, "safetensors", "nano_shard2.safetensors");
    seed("hf_index", "two_shards.json", index, strlen(index));
    {   /* the same tensors, every one in model.safetensors */
        char one[16384];
        size_t k, o = 0;
        for (k = 0; index[k] && o + 1 < sizeof one; k++) {
            if (strncmp(index + k, "model-0000", 10) == 0 && strncmp(index + k + 11, "-of-00002.safetensors", 21) == 0) {
                o += (size_t)snprintf(one + o, sizeof one - o, "model.safetensors");
                k += 31;
            } else {
                one[o++] = index[k];
            }
        }
        one[o] = 0;
        seed("hf_index", "one_shard.json", one, strlen(one));
    }
    check(fuzz_hf_dir(g_ctx, dir, 1, 0, NULL, 0), "the FP8 HF directory");
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    copy_seed(path, "safetensors", "nano_fp8.safetensors");
    copy_seed(path, "hf_weights", "nano_fp8.safetensors");
    {   /* the experts as fused stacks [E, 2I, H] and [E, H, I] */
        moe_st_file *f = NULL;
        moe_config c = fuzz_nano_config();
        int64_t E = c.n_routed_experts, I = c.moe_intermediate_size, H = c.hidden_size, e, k, fs[3];
        float *gu = (float *)malloc(sizeof(float) * (size_t)(E * 2 * I * H)), *dn = (float *)malloc(sizeof(float) * (size_t)(E * H * I));
        snprintf(path, sizeof path, "%s/model.safetensors", dir);
        check(fuzz_hf_dir(g_ctx, dir, 0, 0, NULL, 0), "the F32 HF directory");
        check(moe_st_open(g_ctx, path, &f), "moe_st_open");
        check(moe_st_writer_new(g_ctx, &w), "moe_st_writer_new");
        for (i = 0; i < moe_st_count(f); i++) {
            const moe_st_tensor *t = moe_st_get(f, i);
            if (strncmp(t->name, "model.layers.0.mlp.experts.", 27) == 0) continue;
            check(moe_st_writer_add(g_ctx, w, t->name, t->dtype, t->ndim, t->shape, t->data), "moe_st_writer_add");
        }
        for (e = 0; e < E; e++) {
            char nm[128];
            const moe_st_tensor *t;
            snprintf(nm, sizeof nm, "model.layers.0.mlp.experts.%lld.gate_proj.weight", (long long)e);
            t = moe_st_find(f, nm);
            for (k = 0; t && k < I * H; k++) gu[e * 2 * I * H + k] = moe_st_value(t, k);
            snprintf(nm, sizeof nm, "model.layers.0.mlp.experts.%lld.up_proj.weight", (long long)e);
            t = moe_st_find(f, nm);
            for (k = 0; t && k < I * H; k++) gu[e * 2 * I * H + I * H + k] = moe_st_value(t, k);
            snprintf(nm, sizeof nm, "model.layers.0.mlp.experts.%lld.down_proj.weight", (long long)e);
            t = moe_st_find(f, nm);
            for (k = 0; t && k < H * I; k++) dn[e * H * I + k] = moe_st_value(t, k);
        }
        fs[0] = E; fs[1] = 2 * I; fs[2] = H;
        check(moe_st_writer_add(g_ctx, w, "model.layers.0.mlp.experts.gate_up_proj", MOE_ST_F32, 3, fs, gu), "fused gate_up");
        fs[1] = H; fs[2] = I;
        check(moe_st_writer_add(g_ctx, w, "model.layers.0.mlp.experts.down_proj", MOE_ST_F32, 3, fs, dn), "fused down");
        snprintf(path, sizeof path, "%s/fused.safetensors", g_out);
        check(moe_st_writer_save(g_ctx, w, path), "moe_st_writer_save");
        moe_st_writer_free(w);
        moe_st_close(f);
        free(gu);
        free(dn);
        copy_seed(path, "hf_weights", "nano_fused.safetensors");
        remove(path);
    }
    /* every dtype, a scalar, an empty tensor, a 4-d one */
    check(moe_st_writer_new(g_ctx, &w), "moe_st_writer_new");
    for (i = 0; i < (int)sizeof bytes; i++) bytes[i] = (unsigned char)(i * 37 + 11);
    {
        static const char *const names[MOE_ST_DTYPE_COUNT] = {"f32", "bf16", "f16", "e4m3", "e5m2", "i32", "i64"};
        for (i = 0; i < MOE_ST_DTYPE_COUNT; i++) {
            sh[0] = 2;
            check(moe_st_writer_add(g_ctx, w, names[i], (moe_st_dtype)i, 1, sh, bytes), "moe_st_writer_add");
        }
    }
    check(moe_st_writer_add(g_ctx, w, "scalar", MOE_ST_F32, 0, sh, bytes), "scalar");
    sh[0] = 3; sh[1] = 0;
    check(moe_st_writer_add(g_ctx, w, "empty", MOE_ST_BF16, 2, sh, bytes), "empty");
    sh[0] = 1; sh[1] = 2; sh[2] = 1; sh[3] = 3;
    check(moe_st_writer_add(g_ctx, w, "four_d", MOE_ST_F16, 4, sh, bytes), "four_d");
    check(moe_st_writer_save(g_ctx, w, seed_path("safetensors", "dtypes.safetensors")), "moe_st_writer_save");
    g_count++;
    moe_st_writer_free(w);
    {   /* the same with a __metadata__ object, as PyTorch's writer adds */
        size_t n, hl;
        unsigned char *p = (unsigned char *)read_all(seed_path("safetensors", "dtypes.safetensors"), &n), *q;
        static const char meta[] = "\"__metadata__\":{\"format\":\"pt\"},";
        for (hl = 0, i = 7; i >= 0; i--) hl = (hl << 8) | p[i];
        q = (unsigned char *)malloc(n + sizeof meta + 8);
        for (i = 0; i < 8; i++) q[i] = (unsigned char)((hl + sizeof meta - 1) >> (8 * i));
        q[8] = '{';
        memcpy(q + 9, meta, sizeof meta - 1);
        memcpy(q + 9 + sizeof meta - 1, p + 9, n - 9);
        seed("safetensors", "metadata.safetensors", q, n + sizeof meta - 1);
        free(p);
        free(q);
    }
    check(moe_st_writer_new(g_ctx, &w), "moe_st_writer_new");
    check(moe_st_writer_save(g_ctx, w, seed_path("safetensors", "empty.safetensors")), "moe_st_writer_save");
    g_count++;
    moe_st_writer_free(w);
    {
        static const char *const keys[] = {"dtype", "shape", "data_offsets", "__metadata__", "format", "pt", "F32", "BF16",
                                           "F16", "F8_E4M3", "F8_E5M2", "I32", "I64"};
        static const char *const idx[] = {"weight_map", "metadata", "total_size", "model.safetensors",
                                          "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                                          "model.norm.weight", "lm_head.weight", "model.embed_tokens.weight"};
        dict("safetensors", keys, sizeof keys / sizeof keys[0]);
        dict("hf_weights", keys, sizeof keys / sizeof keys[0]);
        dict("hf_index", idx, sizeof idx / sizeof idx[0]);
    }
    for (i = 0; i < 5; i++) {
        static const char *const files[] = {"config.json", "model.safetensors", "model-00001-of-00002.safetensors",
                                            "model-00002-of-00002.safetensors", "model.safetensors.index.json"};
        snprintf(path, sizeof path, "%s/%s", dir, files[i]);
        remove(path);
    }
    rmdir(dir);
}

/* ---- checkpoints of the nano model: without optimizer, FP32 and BF16 moments ---- */

static void ckpt_seeds(void) {
    moe_config c = fuzz_nano_config();
    moe_model *m = NULL;
    moe_adamw *o = NULL;
    moe_adamw_config oc;
    moe_train_state st;
    int k;
    check(moe_model_new(g_ctx, &c, 1, &m), "moe_model_new");
    memset(&st, 0, sizeof st);
    st.step = 3; st.seed = 42; st.data_index = 3; st.tokens_seen = 384;
    check(moe_ckpt_save(g_ctx, seed_path("ckpt", "model_only.bin"), m, NULL, &st), "moe_ckpt_save");
    g_count++;
    for (k = 0; k < 2; k++) {
        memset(&oc, 0, sizeof oc);
        oc.moment_dtype = k ? MOE_BF16 : MOE_F32;
        check(moe_adamw_new(g_ctx, m, &oc, &o), "moe_adamw_new");
        check(moe_ckpt_save(g_ctx, seed_path("ckpt", k ? "adamw_bf16.bin" : "adamw_f32.bin"), m, o, &st), "moe_ckpt_save");
        g_count++;
        moe_adamw_free(g_ctx, o);
    }
    moe_model_free(g_ctx, m);
}

/* ---- token data: llm.c shards and text ---- */

static void data_seeds(void) {
    static const int counts[] = {0, 3, 300};
    unsigned char buf[1024 + 600];
    char name[64];
    size_t i;
    int k;
    for (k = 0; k < 3; k++) {
        int32_t hdr[3];
        memset(buf, 0, sizeof buf);
        hdr[0] = 20240520; hdr[1] = 1; hdr[2] = counts[k]; /* the llm.c header: magic, version, tokens */
        for (i = 0; i < 3; i++) {
            int b;
            for (b = 0; b < 4; b++) buf[4 * i + (size_t)b] = (unsigned char)((uint32_t)hdr[i] >> (8 * b));
        }
        for (i = 0; i < (size_t)counts[k]; i++) {
            unsigned v = (unsigned)(i * 7919u % 50257u);
            buf[1024 + 2 * i] = (unsigned char)(v & 255u);
            buf[1024 + 2 * i + 1] = (unsigned char)(v >> 8);
        }
        snprintf(name, sizeof name, "shard_%d.bin", counts[k]);
        seed("data", name, buf, 1024 + 2 * (size_t)counts[k]);
    }
    {
        static const char text[] = "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                                   "must be in want of a wife.";
        seed("data", "text.txt", text, sizeof text - 1);
        seed("data", "short.txt", text, 5);
    }
}

/* ---- teacher top-k caches ---- */

static void distill_seeds(void) {
    static const int64_t V[] = {16, 300, 5}, K[] = {4, 1, 5}, rows[] = {6, 3, 2};
    char name[64];
    int k;
    for (k = 0; k < 3; k++) {
        moe_distill_writer *w = NULL;
        moe_tensor *t = NULL;
        int64_t shape[2], i;
        shape[0] = rows[k];
        shape[1] = V[k];
        snprintf(name, sizeof name, "teacher_%d.bin", k);
        check(moe_tensor_new(g_ctx, MOE_F32, 2, shape, &t), "moe_tensor_new");
        for (i = 0; i < t->numel; i++) moe_tensor_set(t, i, 0.1 * (double)((i * 37) % 23) - 1.0);
        check(moe_distill_writer_new(g_ctx, seed_path("distill", name), V[k], K[k], k ? 2.0f : 1.0f, 0x1234u + (uint64_t)k, &w),
              "moe_distill_writer_new");
        check(moe_distill_writer_add(g_ctx, w, t), "moe_distill_writer_add");
        check(moe_distill_writer_finish(g_ctx, w), "moe_distill_writer_finish");
        moe_distill_writer_free(w);
        moe_tensor_free(g_ctx, t);
        g_count++;
    }
}

int main(int argc, char **argv) {
    static const char *const targets[] = {"safetensors", "config", "ckpt", "data", "distill", "hf_index", "hf_weights"};
    size_t i;
    char sub[256];
    if (argc != 2) {
        fprintf(stderr, "usage: gen_corpus OUT\n");
        return 2;
    }
    snprintf(g_out, sizeof g_out, "%s", argv[1]);
    mkdirs("");
    mkdirs("seeds");
    mkdirs("dict");
    for (i = 0; i < sizeof targets / sizeof targets[0]; i++) {
        snprintf(sub, sizeof sub, "seeds/%s", targets[i]);
        mkdirs(sub);
    }
    check(moe_ctx_new(&g_ctx), "moe_ctx_new");
    config_seeds();
    st_seeds();
    ckpt_seeds();
    data_seeds();
    distill_seeds();
    moe_ctx_free(g_ctx);
    printf("gen_corpus: %d seeds in %s/seeds\n", g_count, g_out);
    return 0;
}
