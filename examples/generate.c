/* examples/generate.c — stream text from a trained model with the latent KV cache.

       ./build.sh example generate                          # out/train_tiny/ckpt.bin, greedy
       ./build.sh example generate --model out/train_tiny/hf --prompt "Elizabeth " --temperature 0.8 --top-p 0.95
       ./build.sh example generate --speculative --max-tokens 200

   --model is a checkpoint written by train_tiny (a file) or a Hugging Face DeepseekV3
   directory (config.json + model.safetensors). Tokens are bytes (vocabulary 256), so the prompt
   is used as it is and the output is printed as it comes. --speculative drafts with the MTP
   module(s) and verifies the drafts with the main model in one pass; for temperature 0 the
   text is the same as without it, for temperature > 0 it has the same distribution. A stats
   line follows on stderr: tokens/s, acceptance rate, cache size per token. */
#define MOE_IMPLEMENTATION
#include "moe.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static void usage(FILE *f) {
    fprintf(f,
            "usage: generate [flags]\n"
            "  --model PATH       train_tiny checkpoint file or Hugging Face directory (default out/train_tiny/ckpt.bin)\n"
            "  --prompt TEXT      the prompt (default \"It is a truth universally acknowledged, \")\n"
            "  --max-tokens N     new tokens at most (default 200; 0 = until the cache is full)\n"
            "  --temperature T    0 = greedy (default 0)\n"
            "  --top-k K          keep the K most likely tokens (default 0 = all)\n"
            "  --top-p P          keep the smallest set with probability mass P (default 1 = all)\n"
            "  --seed N           sampling seed (default 1)\n"
            "  --stop TEXT        stop once the output ends with TEXT\n"
            "  --speculative      draft with the MTP module(s), verify with the main model\n"
            "  --threads N        worker threads (default: all cores)\n"
            "  --device D         cpu (default), cuda or cuda:N (a build with the CUDA backend)\n"
            "  --help             this text\n");
}

typedef struct stream {
    int64_t n;
} stream;

/* Print each token as it comes: bytes as they are, other ids as <id>. */
static int on_token(void *user, int32_t tok) {
    stream *s = (stream *)user;
    s->n++;
    if (tok < 256) fputc(tok, stdout);
    else printf("<%d>", (int)tok);
    fflush(stdout);
    return 0;
}

#define CHECK(call)                                                                                \
    do {                                                                                           \
        moe_status s_ = (call);                                                                    \
        if (s_ != MOE_OK) {                                                                        \
            fprintf(stderr, "\ngenerate: %s: %s\n", moe_status_name(s_), moe_ctx_error(ctx));      \
            return 1;                                                                              \
        }                                                                                          \
    } while (0)

int main(int argc, char **argv) {
    const char *model_path = "out/train_tiny/ckpt.bin", *prompt = "It is a truth universally acknowledged, ", *device = NULL;
    long max_tokens = 200, threads = 0, i;
    moe_gen_opts o;
    moe_ctx *ctx = NULL;
    moe_model *m = NULL;
    moe_gen *g = NULL;
    moe_gen_stats st;
    stream sm;
    struct stat sb;
    int32_t *ptoks, *out;
    int64_t np, n_out = 0, cap;
    memset(&o, 0, sizeof o);
    o.seed = 1;
    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        char *end = NULL;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) { usage(stdout); return 0; }
        if (strcmp(a, "--speculative") == 0) { o.speculative = 1; continue; }
        if (!v) { fprintf(stderr, "generate: %s needs a value (see --help)\n", a); return 2; }
        i++;
        if (strcmp(a, "--model") == 0) model_path = v;
        else if (strcmp(a, "--prompt") == 0) prompt = v;
        else if (strcmp(a, "--stop") == 0) o.stop = v;
        else if (strcmp(a, "--device") == 0) device = v;
        else if (strcmp(a, "--max-tokens") == 0) { max_tokens = strtol(v, &end, 10); if (*end || max_tokens < 0) goto bad; }
        else if (strcmp(a, "--threads") == 0) { threads = strtol(v, &end, 10); if (*end || threads < 1) goto bad; }
        else if (strcmp(a, "--top-k") == 0) { o.sampling.top_k = strtol(v, &end, 10); if (*end || o.sampling.top_k < 0) goto bad; }
        else if (strcmp(a, "--temperature") == 0) { o.sampling.temperature = strtof(v, &end); if (*end || !(o.sampling.temperature >= 0)) goto bad; }
        else if (strcmp(a, "--top-p") == 0) { o.sampling.top_p = strtof(v, &end); if (*end || !(o.sampling.top_p >= 0 && o.sampling.top_p <= 1)) goto bad; }
        else if (strcmp(a, "--seed") == 0) { o.seed = strtoull(v, &end, 10); if (*end || *v == '-') goto bad; }
        else { fprintf(stderr, "generate: unknown flag '%s' (see --help)\n", a); return 2; }
        continue;
    bad:
        fprintf(stderr, "generate: bad value '%s' for %s (see --help)\n", v, a);
        return 2;
    }
    if (moe_ctx_new(&ctx) != MOE_OK) return 1;
    if (threads) CHECK(moe_ctx_set_threads(ctx, (int)threads));
    if (device) CHECK(moe_ctx_set_device_name(ctx, device));
    CHECK(moe_ctx_set_grad_enabled(ctx, 0));
    if (stat(model_path, &sb) != 0) {
        fprintf(stderr, "generate: no model at %s (train one with ./build.sh run, or pass --model)\n", model_path);
        return 2;
    }
    if (S_ISDIR(sb.st_mode)) {
        CHECK(moe_model_load_hf(ctx, model_path, &m));
    } else {
        moe_config cfg;
        memset(&cfg, 0, sizeof cfg);
        CHECK(moe_ckpt_config(ctx, model_path, &cfg));
        CHECK(moe_model_new(ctx, &cfg, 0, &m));
        CHECK(moe_ckpt_load(ctx, model_path, m, NULL, NULL));
    }
    if (o.speculative && moe_model_config(m)->num_nextn_predict_layers < 1)
        fprintf(stderr, "generate: the model has no MTP module; --speculative decodes plainly\n");
    np = (int64_t)strlen(prompt);
    if (np < 1) { fprintf(stderr, "generate: the prompt is empty\n"); return 2; }
    CHECK(moe_gen_new(ctx, m, 0, &g));
    if (np > moe_gen_capacity(g)) {
        /* keep the end of a long prompt: the model has seen max_position_embeddings tokens at most */
        prompt += np - moe_gen_capacity(g) / 2;
        np = moe_gen_capacity(g) / 2;
        fprintf(stderr, "generate: prompt cut to its last %lld bytes (max_position_embeddings %lld)\n", (long long)np,
                (long long)moe_gen_capacity(g));
    }
    if (max_tokens > 0 && np + max_tokens - 1 > moe_gen_capacity(g)) {
        max_tokens = (long)(moe_gen_capacity(g) - np + 1);
        fprintf(stderr, "generate: --max-tokens cut to %ld (the cache holds max_position_embeddings = %lld tokens)\n", max_tokens,
                (long long)moe_gen_capacity(g));
    }
    o.max_tokens = max_tokens;
    ptoks = (int32_t *)malloc(sizeof(int32_t) * (size_t)np);
    cap = moe_gen_capacity(g) + 1;
    out = (int32_t *)malloc(sizeof(int32_t) * (size_t)cap);
    if (!ptoks || !out) return 1;
    for (i = 0; i < np; i++) ptoks[i] = (unsigned char)prompt[i];
    sm.n = 0;
    o.on_token = on_token;
    o.user = &sm;
    fwrite(prompt, 1, (size_t)np, stdout);
    fflush(stdout);
    CHECK(moe_gen_generate(ctx, g, ptoks, np, &o, out, cap, &n_out, &st));
    printf("\n");
    fflush(stdout);
    {
        char acc[64];
        if (o.speculative) snprintf(acc, sizeof acc, "acceptance %.3f (%lld/%lld drafts)", st.acceptance, (long long)st.accepted, (long long)st.drafted);
        else snprintf(acc, sizeof acc, "no speculation");
        fprintf(stderr, "[stats] %lld prompt + %lld new tokens | %.1f tok/s | %s | %lld main passes | KV cache %lld B/token (MHA: %lld)\n",
                (long long)st.prompt_tokens, (long long)st.new_tokens, st.tok_s, acc, (long long)st.main_passes,
                (long long)st.cache_bytes_per_token, (long long)st.mha_cache_bytes_per_token);
    }
    free(ptoks);
    free(out);
    moe_gen_free(g);
    moe_model_free(ctx, m);
    moe_ctx_free(ctx);
    return 0;
}
