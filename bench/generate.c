/* bench/generate.c — decoding speed with the latent KV cache, plain vs self-speculative
   (MTP drafts verified by the main model in one pass), on the model `./build.sh run` trains.

     generate [CKPT] [--tokens N] [--rounds R] [--threads N] [--temperature T]

   CKPT defaults to out/train_tiny/ckpt.bin. Prompts are windows of data/austen.txt (the
   validation part when present). Each round generates N tokens from each prompt plainly and
   then speculatively, alternating, so both see the same machine load. The machine is shared
   and noisy, so a prompt's time in a mode is its fastest of the R rounds (each round does the
   same work: greedy decoding is deterministic), and a mode's rate is its total tokens over the
   sum of those times (prompt passes excluded); the plain mean over all rounds is printed too.
   Greedy by default: the two outputs are then also checked to be identical.

   Last line: {"bench":"generate","tok_s_plain":…,"tok_s_spec":…,"speedup":…,"acceptance":…,
   "cache_bytes_per_token":…,"mha_cache_bytes_per_token":…} */
#define MOE_IMPLEMENTATION
#include "moe.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench_cpu.h"

#define CHECK(call)                                                                                        \
    do {                                                                                                   \
        moe_status s_ = (call);                                                                            \
        if (s_ != MOE_OK) {                                                                                \
            fprintf(stderr, "bench generate: %s: %s\n", moe_status_name(s_), moe_ctx_error(ctx));          \
            return 1;                                                                                      \
        }                                                                                                  \
    } while (0)

static long read_file(const char *path, char **out) {
    FILE *f = fopen(path, "rb");
    long n;
    if (!f) return -1;
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fseek(f, 0, SEEK_SET);
    *out = (char *)malloc((size_t)n + 1);
    if (!*out || fread(*out, 1, (size_t)n, f) != (size_t)n) { fclose(f); return -1; }
    fclose(f);
    return n;
}

int main(int argc, char **argv) {
    const char *ckpt = "out/train_tiny/ckpt.bin", *text_path = "data/austen.txt";
    long n_tok = 200, rounds = 5, threads = 0, n_prompts = 8, prompt_len = 32, i, r, p;
    double temperature = 0;
    moe_ctx *ctx = NULL;
    moe_config cfg;
    moe_model *m = NULL;
    moe_gen *g = NULL;
    moe_gen_opts o;
    char *text = NULL;
    long text_n;
    bench_cpu cpu;
    char cpu_json[512];
    int32_t prompt[256], *out_plain, *out_spec;
    double tok_plain = 0, s_plain = 0, tok_spec = 0, s_spec = 0, t_pl, t_sp, best_pl[64], best_sp[64], bs_pl = 0, bs_sp = 0;
    int64_t drafted = 0, accepted = 0, passes_plain = 0, passes_spec = 0, lat = 0, mha = 0;
    long mismatches = 0;
    FILE *f;
    for (i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--tokens") == 0 && i + 1 < argc) n_tok = atol(argv[++i]);
        else if (strcmp(argv[i], "--rounds") == 0 && i + 1 < argc) rounds = atol(argv[++i]);
        else if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc) threads = atol(argv[++i]);
        else if (strcmp(argv[i], "--temperature") == 0 && i + 1 < argc) temperature = atof(argv[++i]);
        else if (argv[i][0] != '-') ckpt = argv[i];
        else { fprintf(stderr, "usage: generate [CKPT] [--tokens N] [--rounds R] [--threads N] [--temperature T]\n"); return 2; }
    }
    if (n_tok < 2 || rounds < 1 || n_prompts > 64) { fprintf(stderr, "bench generate: --tokens >= 2 and --rounds >= 1\n"); return 2; }
    f = fopen(ckpt, "rb");
    if (!f) {
        fprintf(stderr, "bench generate: no checkpoint at %s — train one first with ./build.sh run (it writes "
                        "out/train_tiny/ckpt.bin), or pass a checkpoint path\n", ckpt);
        return 2;
    }
    fclose(f);
    if (moe_ctx_new(&ctx) != MOE_OK) return 1;
    if (threads) CHECK(moe_ctx_set_threads(ctx, (int)threads));
    CHECK(moe_ckpt_config(ctx, ckpt, &cfg));
    CHECK(moe_model_new(ctx, &cfg, 0, &m));
    CHECK(moe_ckpt_load(ctx, ckpt, m, NULL, NULL));
    CHECK(moe_ctx_set_grad_enabled(ctx, 0));
    if (cfg.num_nextn_predict_layers < 1) { fprintf(stderr, "bench generate: the model has no MTP module to draft with\n"); return 2; }
    if (cfg.vocab_size < 256) { fprintf(stderr, "bench generate: want a byte-level model (vocab >= 256)\n"); return 2; }
    if (prompt_len + n_tok - 1 > cfg.max_position_embeddings) {
        prompt_len = cfg.max_position_embeddings / 4;
        if (prompt_len + n_tok - 1 > cfg.max_position_embeddings) n_tok = cfg.max_position_embeddings - prompt_len + 1;
    }
    text_n = read_file(text_path, &text);
    if (text_n < 1000) {
        fprintf(stderr, "bench generate: cannot read %s (run ./build.sh once to prepare the data)\n", text_path);
        return 2;
    }
    CHECK(moe_gen_new(ctx, m, 0, &g));
    out_plain = (int32_t *)malloc(sizeof(int32_t) * (size_t)n_tok);
    out_spec = (int32_t *)malloc(sizeof(int32_t) * (size_t)n_tok);
    moe_gen_cache_bytes(m, &lat, &mha);
    bench_cpu_read(&cpu);
    printf("CPU: %s (%s)\n", cpu.model, cpu.id);
    printf("model %s: %lld layers + %lld MTP, d=%lld, %lld experts (top-%lld), %d threads; %ld tokens x %ld prompts x %ld rounds, %s\n",
           ckpt, (long long)cfg.num_hidden_layers, (long long)cfg.num_nextn_predict_layers, (long long)cfg.hidden_size,
           (long long)cfg.n_routed_experts, (long long)cfg.num_experts_per_tok, moe_ctx_threads(ctx), n_tok, n_prompts, rounds,
           temperature > 0 ? "sampling" : "greedy");
    memset(&o, 0, sizeof o);
    o.sampling.temperature = (float)temperature;
    o.max_tokens = n_tok;
    printf("%-6s %-7s %12s %12s %10s %12s\n", "round", "prompt", "plain tok/s", "spec tok/s", "speedup", "acceptance");
    for (r = 0; r < rounds; r++) {
        for (p = 0; p < n_prompts; p++) {
            long start = (long)(text_n * 0.9) + p * 997 % (long)(text_n * 0.1 - prompt_len - 1), j;
            int64_t n1 = 0, n2 = 0;
            moe_gen_stats a, b;
            for (j = 0; j < prompt_len; j++) prompt[j] = (unsigned char)text[start + j];
            o.seed = (uint64_t)(r * 100 + p);
            o.speculative = 0;
            CHECK(moe_gen_generate(ctx, g, prompt, prompt_len, &o, out_plain, n_tok, &n1, &a));
            o.speculative = 1;
            CHECK(moe_gen_generate(ctx, g, prompt, prompt_len, &o, out_spec, n_tok, &n2, &b));
            if (temperature <= 0)
                for (j = 0; j < n1 && j < n2; j++)
                    if (out_plain[j] != out_spec[j]) { mismatches++; break; }
            if (r == 0 || a.decode_s < best_pl[p]) best_pl[p] = a.decode_s;
            if (r == 0 || b.decode_s < best_sp[p]) best_sp[p] = b.decode_s;
            tok_plain += (double)(n1 - 1);
            s_plain += a.decode_s;
            tok_spec += (double)(n2 - 1);
            s_spec += b.decode_s;
            drafted += b.drafted;
            accepted += b.accepted;
            passes_plain += a.main_passes;
            passes_spec += b.main_passes;
            printf("%-6ld %-7ld %12.1f %12.1f %9.2fx %12.3f\n", r, p, a.tok_s, b.tok_s, a.tok_s > 0 ? b.tok_s / a.tok_s : 0,
                   b.acceptance);
            fflush(stdout);
        }
    }
    for (p = 0; p < n_prompts; p++) {
        bs_pl += best_pl[p];
        bs_sp += best_sp[p];
    }
    printf("\nmean over all rounds: plain %.1f tok/s, speculative %.1f tok/s (%.2fx)\n", tok_plain / s_plain, tok_spec / s_spec,
           s_spec > 0 ? (tok_spec / s_spec) / (tok_plain / s_plain) : 0);
    t_pl = bs_pl > 0 ? tok_plain / (double)rounds / bs_pl : 0;
    t_sp = bs_sp > 0 ? tok_spec / (double)rounds / bs_sp : 0;
    printf("best of %ld rounds:   plain %.1f tok/s, speculative %.1f tok/s (%.2fx); acceptance %.3f (%lld/%lld drafts); main passes %lld vs %lld\n",
           rounds, t_pl, t_sp, t_pl > 0 ? t_sp / t_pl : 0, drafted ? (double)accepted / (double)drafted : 0, (long long)accepted,
           (long long)drafted, (long long)passes_spec, (long long)passes_plain);
    printf("KV cache: %lld bytes/token (latent c_KV + k_pe, %lld layers) vs %lld for a multi-head cache (%.1fx smaller)\n",
           (long long)lat, (long long)cfg.num_hidden_layers, (long long)mha, lat ? (double)mha / (double)lat : 0);
    if (temperature <= 0)
        printf("greedy outputs identical plain vs speculative: %s\n", mismatches ? "NO" : "yes");
    printf("{\"bench\":\"generate\",%s,\"tok_s_plain\":%.1f,\"tok_s_spec\":%.1f,\"speedup\":%.3f,\"acceptance\":%.4f,"
           "\"cache_bytes_per_token\":%lld,\"mha_cache_bytes_per_token\":%lld}\n",
           bench_cpu_json(&cpu, cpu_json, sizeof cpu_json), t_pl, t_sp, t_pl > 0 ? t_sp / t_pl : 0, drafted ? (double)accepted / (double)drafted : 0, (long long)lat, (long long)mha);
    free(out_plain);
    free(out_spec);
    free(text);
    moe_gen_free(g);
    moe_model_free(ctx, m);
    moe_ctx_free(ctx);
    return mismatches ? 1 : 0;
}
