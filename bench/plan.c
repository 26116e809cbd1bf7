/* bench/plan.c — a cost model on paper, for the scale this machine cannot run.

   Given a model (any moe.h config: tiny, small, DeepSeek-V3, or a Hugging Face config.json)
   and a cluster (nodes, GPUs per node, NVLink and InfiniBand bandwidths, peak FLOP/s, MFU),
   it prints per token: parameters total and active, training FLOPs, the latent KV cache,
   the expert-parallel all-to-all bytes with node-limited routing; memory per GPU by kind and
   precision; and GPU-hours for a token budget. For DeepSeek-V3 each line stands beside the
   figure DeepSeek published, and beside the dense LLaMA-3.1 405B they compared it with.

   Every count is derived here from the config's shapes, not read from moe.h; `--check`
   compares the parameter counts and the activation bytes with what moe.h allocates and stashes
   for real models (tiny and small, FP32/BF16/FP8) and exits non-zero on any difference.

   usage: plan [--config tiny|small|v3|FILE] [--seq S] [--nodes N] [--gpus-per-node G]
               [--pp P] [--ep E] [--node-limit M] [--nvlink-gbs B] [--ib-gbs B]
               [--peak-tflops F] [--mfu U] [--tokens T] [--gpu-hours H] [--check]
   Defaults: DeepSeek-V3 pre-training as published (V3 paper §3–4): 2,048 H800 GPUs in 256
   nodes of 8, PP 16, EP 64, at most 4 nodes per token, NVLink 160 GB/s, InfiniBand 50 GB/s
   per GPU, sequence 4096, 14.8T tokens, 2.664M GPU-hours; peak 989.4 TFLOP/s (H800 dense
   BF16), MFU 0.40 for the planned hours.

   Last line: {"bench":"plan","deepseek_v3":{"params_total":…,"params_active":…,
   "train_flops_per_token":…,"train_flops_per_token_with_mtp":…,"kv_bytes_per_token":…,
   "implied_mfu":…},"llama3_405b":{"params_total":…,"train_flops_per_token":…,
   "kv_bytes_per_token":…}} ("model" instead of "deepseek_v3" for another config). */
#define MOE_IMPLEMENTATION
#include "moe.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* DeepSeek-V3's config.json (Hugging Face deepseek-ai/DeepSeek-V3; reference §1.2). */
static const char *V3_CONFIG =
    "{\"vocab_size\":129280,\"hidden_size\":7168,\"intermediate_size\":18432,\"moe_intermediate_size\":2048,"
    "\"num_hidden_layers\":61,\"first_k_dense_replace\":3,\"num_attention_heads\":128,\"num_key_value_heads\":128,"
    "\"q_lora_rank\":1536,\"kv_lora_rank\":512,\"qk_nope_head_dim\":128,\"qk_rope_head_dim\":64,\"v_head_dim\":128,"
    "\"n_routed_experts\":256,\"n_shared_experts\":1,\"num_experts_per_tok\":8,\"n_group\":8,\"topk_group\":4,"
    "\"scoring_func\":\"sigmoid\",\"topk_method\":\"noaux_tc\",\"norm_topk_prob\":true,\"routed_scaling_factor\":2.5,"
    "\"num_nextn_predict_layers\":1,\"rope_theta\":10000,\"max_position_embeddings\":163840,"
    "\"rope_scaling\":{\"type\":\"yarn\",\"factor\":40,\"original_max_position_embeddings\":4096,\"beta_fast\":32,"
    "\"beta_slow\":1,\"mscale\":1.0,\"mscale_all_dim\":1.0},\"rms_norm_eps\":1e-6,\"tie_word_embeddings\":false}";

/* What DeepSeek published (V3 paper §1, §3, §4.2; the V3 hardware paper's Table 2 for FLOPs
   and KV cache) and the LLaMA-3.1 405B figures of the same table. */
#define PUB_V3_TOTAL 671e9
#define PUB_V3_ACTIVE 36.7e9 /* the weights README; the paper's abstract rounds it to 37B */
#define PUB_V3_FLOPS 250e9
#define PUB_V3_KV 70272.0
#define PUB_V3_TOKENS 14.8e12
#define PUB_V3_GPU_HOURS 2.664e6
#define PUB_V3_MTP 11.5e9 /* unique MTP parameters, the weights README */
#define PUB_LLAMA_FLOPS 2448e9
#define PUB_LLAMA_KV 516e3

/* ---- the model: parameters ---- */

typedef struct counts {
    double total;        /* the main model, expert biases included */
    double biases;       /* of which expert-bias buffers (not trained) */
    double active;       /* the weights one token's forward multiplies by: 8 routed experts, the head
                            (DeepSeek's 36.6B/36.7B count the same); the embedding is a row read */
    double embedding;    /* the embedding table */
    double routed;       /* routed-expert weights, all of them */
    double mtp;          /* MTP modules' own parameters (embedding and head are shared) */
    double mtp_biases;   /* of which expert-bias buffers */
    double mtp_routed;   /* of which routed-expert weights */
    double matmul;       /* active weights one token multiplies by, main model (no embedding) */
    double mtp_matmul;   /* the same for the MTP modules (head included) */
} counts;

static double mla_params(const moe_config *c) {
    double d = c->hidden_size, H = c->num_attention_heads, qr = c->q_lora_rank, kvr = c->kv_lora_rank;
    double dqk = c->qk_nope_head_dim + c->qk_rope_head_dim, dn = c->qk_nope_head_dim, dv = c->v_head_dim;
    double q = qr > 0 ? d * qr + qr + qr * H * dqk : d * H * dqk;
    return q + d * (kvr + c->qk_rope_head_dim) + kvr + kvr * H * (dn + dv) + H * dv * d;
}
static double mla_matmul(const moe_config *c) { /* mla_params without the two norm vectors */
    return mla_params(c) - c->kv_lora_rank - (c->q_lora_rank > 0 ? c->q_lora_rank : 0);
}
/* One block's parameters (MoE or dense), and the active matmul weights of one token. */
static void block_params(const moe_config *c, int moe, double *all, double *active_mm, double *routed, double *bias) {
    double d = c->hidden_size, E = c->n_routed_experts, K = c->num_experts_per_tok, I = c->moe_intermediate_size;
    double Is = c->n_shared_experts * I;
    *all = 2 * d + mla_params(c);
    *active_mm = mla_matmul(c);
    *routed = *bias = 0;
    if (moe) {
        *routed = E * 3 * d * I;
        *bias = E;
        *all += *routed + 3 * d * Is + d * E + E;
        *active_mm += K * 3 * d * I + 3 * d * Is + d * E;
    } else {
        *all += 3 * d * c->intermediate_size;
        *active_mm += 3 * d * c->intermediate_size;
    }
}

static counts count_params(const moe_config *c) {
    counts n;
    double d = c->hidden_size, V = c->vocab_size, all, mm, routed, bias;
    int64_t L, k;
    memset(&n, 0, sizeof n);
    n.embedding = V * d;
    n.total = V * d + (c->tie_word_embeddings ? 0 : V * d) + d; /* embedding, head, final norm */
    n.matmul = V * d;                                            /* the head */
    for (L = 0; L < c->num_hidden_layers; L++) {
        block_params(c, L >= c->first_k_dense_replace, &all, &mm, &routed, &bias);
        n.total += all;
        n.matmul += mm;
        n.routed += routed;
        n.biases += bias;
    }
    n.active = n.total - (c->tie_word_embeddings ? 0 : n.embedding) - n.routed + (c->num_hidden_layers - c->first_k_dense_replace) * c->num_experts_per_tok * 3 * d *
                                        c->moe_intermediate_size;
    for (k = 0; k < c->num_nextn_predict_layers; k++) { /* enorm, hnorm, eh_proj, a block, the head's norm */
        block_params(c, c->num_hidden_layers + k >= c->first_k_dense_replace, &all, &mm, &routed, &bias);
        n.mtp += 3 * d + 2 * d * d + all;
        n.mtp_biases += bias;
        n.mtp_routed += routed;
        n.mtp_matmul += 2 * d * d + mm + V * d;
    }
    return n;
}

/* ---- compute, cache, activations ---- */

/* Training FLOPs per token at sequence S: 3 × (2 × the weights it multiplies by + causal
   attention over (S + 1)/2 keys on average: scores and values, 2·H·(d_qk + d_v) per key). */
static double attn_flops(const moe_config *c, double S) {
    return 2.0 * c->num_attention_heads * (c->qk_nope_head_dim + c->qk_rope_head_dim + c->v_head_dim) * (S + 1) / 2;
}
static double train_flops(const moe_config *c, const counts *n, double S, int with_mtp) {
    double f = 2 * n->matmul + c->num_hidden_layers * attn_flops(c, S);
    if (with_mtp) f += 2 * n->mtp_matmul + c->num_nextn_predict_layers * attn_flops(c, S);
    return 3 * f;
}
/* Absorbed MLA decoding keeps the normed latent and the RoPE key: (d_c + d_R) values a layer. */
static double kv_bytes(const moe_config *c, double bytes_per_value) {
    return (double)c->num_hidden_layers * (c->kv_lora_rank + c->qk_rope_head_dim) * bytes_per_value;
}

/* Bytes of a stashed row of `cols` activations in precision mode prec (moe.h's recipe: FP8
   E4M3 codes with an FP32 scale per 128 values where fp8_ok, else BF16; FP32 keeps FP32). */
static double stash_row(moe_dtype prec, double cols, int fp8_ok) {
    if (prec == MOE_F32) return 4 * cols;
    if (prec == MOE_FP8_E4M3 && fp8_ok) return cols + 4 * ceil(cols / 128);
    return 2 * cols;
}
/* Activation bytes a block keeps for backward, per token (B sequences of T tokens: the
   balance-loss fractions are per sequence) and per step. */
static void block_activations(const moe_config *c, int moe, moe_dtype prec, double T, double *per_token, double *per_step) {
    double d = c->hidden_size, H = c->num_attention_heads, qr = c->q_lora_rank, kvr = c->kv_lora_rank;
    double dqk = c->qk_nope_head_dim + c->qk_rope_head_dim, dv = c->v_head_dim;
    double E = c->n_routed_experts, K = c->num_experts_per_tok, I = c->moe_intermediate_size;
    double Is = c->n_shared_experts * I, a;
    /* MLA: input, q latent and its norm, kv latent and its norm, q, k, v, o; log-sum-exp and
       the RMSNorm scales in FP32 */
    a = stash_row(prec, d, 1) + (qr > 0 ? stash_row(prec, qr, 0) + stash_row(prec, qr, 1) : 0) + stash_row(prec, kvr, 0) +
        stash_row(prec, kvr, 1) + 2 * stash_row(prec, H * dqk, 0) + 2 * stash_row(prec, H * dv, 0) + 4 * H +
        4 * (qr > 0 ? 2 : 1);
    *per_step = 0;
    if (!moe) { /* FFN: input and the SwiGLU input */
        a += stash_row(prec, d, 1) + stash_row(prec, 2 * c->intermediate_size, 1);
    } else {    /* input; K routed and the shared SwiGLU inputs; router state (scores, gates, sums,
                   per-sequence fractions in FP32, three int32 maps per slot), expert offsets */
        a += stash_row(prec, d, 0) + K * stash_row(prec, 2 * I, 1) + (Is > 0 ? stash_row(prec, 2 * Is, 1) : 0) +
             4 * (E + K + 1 + E / T) + 4 * 3 * K;
        *per_step = 8 * (E + 1);
    }
    *per_token = a;
}
/* All the blocks' activation bytes in one training step of B sequences of T tokens: the main
   model's over all T positions, MTP module k's over the T − k positions that have a token k
   positions ahead. */
static double model_activations(const moe_config *c, moe_dtype prec, double B, double T) {
    double pt, ps, total = 0, Tk;
    int64_t L;
    for (L = 0; L < c->num_hidden_layers + c->num_nextn_predict_layers; L++) {
        Tk = L < c->num_hidden_layers ? T : T - (L - c->num_hidden_layers + 1);
        if (Tk < 1) continue;
        block_activations(c, L >= c->first_k_dense_replace, prec, Tk, &pt, &ps);
        total += pt * B * Tk + ps;
    }
    return total;
}

/* ---- the cluster ---- */

typedef struct cluster {
    double nodes, gpn, pp, ep, node_limit, nvlink, ib, peak, mfu, tokens, gpu_hours, seq;
} cluster;

/* Bytes per token that one training step sends over InfiniBand and over NVLink in the
   expert-parallel all-to-alls of all MoE layers: forward dispatch in FP8 with its 1×128
   scales, forward combine in BF16, and their backward (a combine and a dispatch) in BF16.
   A token reaches at most node_limit of the EP group's nodes; it enters each once over IB
   unless the node is its own (a fraction (n − 1)/n with uniform routing), then reaches its
   experts' GPUs over NVLink (all but a 1/G share on its GPU). */
static void a2a_bytes(const moe_config *c, const cluster *k, double *ib, double *nvl) {
    double d = c->hidden_size, K = c->num_experts_per_tok, ep_nodes = k->ep / k->gpn, nodes, row;
    double layers = (double)(c->num_hidden_layers - c->first_k_dense_replace);
    if (ep_nodes < 1) ep_nodes = 1;
    nodes = k->node_limit < ep_nodes ? k->node_limit : ep_nodes;
    if (nodes > K) nodes = K;
    row = (d + 4 * ceil(d / 128)) + 2 * d + 2 * (2 * d);
    *ib = layers * nodes * (ep_nodes - 1) / ep_nodes * row;
    *nvl = layers * K * row * (k->gpn - 1) / k->gpn;
}

/* Training memory per GPU: PP stages, the routed experts split EP ways, ZeRO-1 sharding the
   master weights and moments over the data-parallel ranks (GPUs / PP; the experts' over
   that / EP). V3's precisions (V3 paper §3.3): BF16 weights, FP32 gradients and master
   weights, BF16 AdamW moments; moe.h's: FP32 weights (they are the master) and gradients,
   FP32 moments. */
typedef struct mem {
    double weights, grads, master, moments;
} mem;
static mem memory_per_gpu(const counts *n, const cluster *k, int moeh) {
    double gpus = k->nodes * k->gpn, dp = gpus / k->pp, edp = dp / k->ep;
    double routed = n->routed + n->mtp_routed; /* the MTP block's experts are split EP ways too */
    double dense = (n->total + n->mtp - routed) / k->pp, expert = routed / k->pp / k->ep;
    mem m;
    if (edp < 1) edp = 1;
    m.weights = (moeh ? 4 : 2) * (dense + expert);
    m.grads = 4 * (dense + expert);
    m.master = moeh ? 0 : 4 * (dense / dp + expert / edp);
    m.moments = (moeh ? 8 : 4) * (dense / dp + expert / edp);
    return m;
}

/* ---- LLaMA-3.1 405B (dense, grouped-query attention), for the comparison ---- */

typedef struct dense_gqa {
    double layers, d, heads, kv_heads, head_dim, ffn, vocab;
} dense_gqa;
static const dense_gqa LLAMA_405B = {126, 16384, 128, 8, 128, 53248, 128256};

static double gqa_layer_matmul(const dense_gqa *m) {
    return 2 * m->d * m->heads * m->head_dim + 2 * m->d * m->kv_heads * m->head_dim + 3 * m->d * m->ffn;
}
static double gqa_params(const dense_gqa *m) { return m->layers * (gqa_layer_matmul(m) + 2 * m->d) + 2 * m->vocab * m->d + m->d; }
static double gqa_train_flops(const dense_gqa *m, double S) {
    double mm = m->layers * gqa_layer_matmul(m) + m->vocab * m->d;
    return 3 * (2 * mm + m->layers * 2.0 * m->heads * (2 * m->head_dim) * (S + 1) / 2);
}
static double gqa_kv_bytes(const dense_gqa *m) { return m->layers * 2 * m->kv_heads * m->head_dim * 2; }

/* ---- --check: the counts against moe.h's real models ---- */

static int check_equal(const char *what, double got, double plan) {
    int ok = got == plan;
    printf("  %-44s moe.h %14.0f  plan %14.0f  %s\n", what, got, plan, ok ? "ok" : "DIFFERENT");
    return !ok;
}
static int check_config(moe_ctx *ctx, const char *name, moe_config c) {
    static const moe_dtype precs[3] = {MOE_F32, MOE_BF16, MOE_FP8_E4M3};
    const int64_t B = 2, T = 16;
    moe_model *m = NULL;
    counts n;
    int64_t total = 0, active = 0, mtp = 0, all = 0, i;
    int32_t tokens[2 * 17];
    int bad = 0, p;
    moe_loss_opts opts;
    moe_config_resolve(&c, &c);
    n = count_params(&c);
    if (moe_model_new(ctx, &c, 7, &m)) {
        fprintf(stderr, "plan --check: %s\n", moe_ctx_error(ctx));
        return 1;
    }
    printf("check: the %s config (%lld layers, %lld MTP)\n", name, (long long)c.num_hidden_layers,
           (long long)c.num_nextn_predict_layers);
    moe_model_param_counts(m, &total, &active, &mtp);
    for (i = 0; i < moe_model_tensor_count(m); i++) all += moe_model_tensor(m, i, NULL, NULL)->numel;
    bad |= check_equal("all tensors (expert biases included)", (double)all, n.total + n.mtp);
    bad |= check_equal("trained parameters, main model", (double)total, n.total - n.biases);
    bad |= check_equal("active parameters, embedding table too", (double)active, n.active + n.embedding - n.biases);
    bad |= check_equal("trained parameters, MTP modules", (double)mtp, n.mtp - n.mtp_biases);
    for (i = 0; i < B * (T + 1); i++) tokens[i] = (int32_t)((i * 37 + 11) % c.vocab_size);
    memset(&opts, 0, sizeof opts);
    opts.mtp_lambda = 0.3f;
    for (p = 0; p < 3; p++) {
        moe_tensor *loss = NULL;
        char what[64];
        moe_ctx_reset(ctx);
        if (moe_ctx_set_gemm_precision(ctx, precs[p]) || moe_model_loss(ctx, m, tokens, B, T, &opts, &loss, NULL)) {
            fprintf(stderr, "plan --check: %s\n", moe_ctx_error(ctx));
            bad = 1;
            break;
        }
        snprintf(what, sizeof what, "activation bytes of a step, %s (%lldx%lld)", moe_dtype_name(precs[p]), (long long)B,
                 (long long)T);
        bad |= check_equal(what, (double)moe_ctx_saved_bytes(ctx), model_activations(&c, precs[p], (double)B, (double)T));
    }
    moe_ctx_reset(ctx);
    moe_ctx_set_gemm_precision(ctx, MOE_F32);
    moe_model_free(ctx, m);
    return bad;
}

/* ---- the report ---- */

static void usage(void) {
    fprintf(stderr, "usage: plan [--config tiny|small|v3|FILE] [--seq S] [--nodes N] [--gpus-per-node G] [--pp P] [--ep E]\n"
                    "            [--node-limit M] [--nvlink-gbs B] [--ib-gbs B] [--peak-tflops F] [--mfu U] [--tokens T]\n"
                    "            [--gpu-hours H] [--check]\n");
    exit(2);
}
static double arg_num(int argc, char **argv, int *i) {
    char *end;
    double v;
    if (*i + 1 >= argc) usage();
    v = strtod(argv[++*i], &end);
    if (*end || !(v > 0) || !isfinite(v)) {
        fprintf(stderr, "plan: %s wants a positive number, got '%s'\n", argv[*i - 1], argv[*i]);
        exit(2);
    }
    return v;
}
static void line(const char *what, double ours, const char *unit, double published, const char *source) {
    if (published > 0)
        printf("  %-38s %12.4g %-6s published %12.4g  (%+.2f%%)  %s\n", what, ours, unit, published,
               100 * (ours / published - 1), source);
    else
        printf("  %-38s %12.4g %s\n", what, ours, unit);
}

int main(int argc, char **argv) {
    moe_ctx *ctx = NULL;
    moe_config c;
    cluster k = {256, 8, 16, 64, 4, 160, 50, 989.4, 0.40, PUB_V3_TOKENS, PUB_V3_GPU_HOURS, 4096};
    const char *config = "v3";
    int check = 0, i, is_v3, hours_given = 0;
    counts n;
    double f_main, f_all, kv, ib, nvl, gpus, gpu_hours, implied_mfu, act_tok, act_step, l_params, l_flops, l_kv;
    mem v3m, ours;
    for (i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--config") && i + 1 < argc) config = argv[++i];
        else if (!strcmp(a, "--seq")) k.seq = arg_num(argc, argv, &i);
        else if (!strcmp(a, "--nodes")) k.nodes = arg_num(argc, argv, &i);
        else if (!strcmp(a, "--gpus-per-node")) k.gpn = arg_num(argc, argv, &i);
        else if (!strcmp(a, "--pp")) k.pp = arg_num(argc, argv, &i);
        else if (!strcmp(a, "--ep")) k.ep = arg_num(argc, argv, &i);
        else if (!strcmp(a, "--node-limit")) k.node_limit = arg_num(argc, argv, &i);
        else if (!strcmp(a, "--nvlink-gbs")) k.nvlink = arg_num(argc, argv, &i);
        else if (!strcmp(a, "--ib-gbs")) k.ib = arg_num(argc, argv, &i);
        else if (!strcmp(a, "--peak-tflops")) k.peak = arg_num(argc, argv, &i);
        else if (!strcmp(a, "--mfu")) k.mfu = arg_num(argc, argv, &i);
        else if (!strcmp(a, "--tokens")) k.tokens = arg_num(argc, argv, &i);
        else if (!strcmp(a, "--gpu-hours")) k.gpu_hours = arg_num(argc, argv, &i), hours_given = 1;
        else if (!strcmp(a, "--check")) check = 1;
        else usage();
    }
    if (moe_ctx_new(&ctx)) return 1;
    if (check) {
        int bad = check_config(ctx, "tiny", moe_config_tiny()) | check_config(ctx, "small", moe_config_small());
        printf("check: %s\n", bad ? "FAILED" : "the cost model's counts are moe.h's");
        moe_ctx_free(ctx);
        return bad;
    }
    is_v3 = !strcmp(config, "v3");
    if (is_v3) {
        if (moe_config_parse(ctx, V3_CONFIG, strlen(V3_CONFIG), &c)) goto fail;
    } else if (!strcmp(config, "tiny")) {
        c = moe_config_tiny();
    } else if (!strcmp(config, "small")) {
        c = moe_config_small();
    } else if (moe_config_load(ctx, config, &c)) {
        goto fail;
    }
    moe_config_resolve(&c, &c);
    if (moe_config_validate(ctx, &c)) goto fail;
    if (k.mfu > 1 || k.pp > c.num_hidden_layers || k.ep > c.n_routed_experts || k.ep > k.nodes * k.gpn) {
        fprintf(stderr, "plan: want mfu <= 1, pp <= layers, ep <= experts and ep <= GPUs\n");
        return 2;
    }
    gpus = k.nodes * k.gpn;
    n = count_params(&c);
    f_main = train_flops(&c, &n, k.seq, 0);
    f_all = train_flops(&c, &n, k.seq, 1);
    kv = kv_bytes(&c, 2);
    a2a_bytes(&c, &k, &ib, &nvl);
    block_activations(&c, 1, MOE_FP8_E4M3, k.seq, &act_tok, &act_step);
    gpu_hours = k.tokens * f_all / (k.peak * 1e12 * k.mfu) / 3600;
    implied_mfu = is_v3 || hours_given ? k.tokens * f_all / (k.gpu_hours * 3600 * k.peak * 1e12) : 0;
    v3m = memory_per_gpu(&n, &k, 0);
    ours = memory_per_gpu(&n, &k, 1);
    l_params = gqa_params(&LLAMA_405B);
    l_flops = gqa_train_flops(&LLAMA_405B, 4096); /* the sequence of the published figure */
    l_kv = gqa_kv_bytes(&LLAMA_405B);

    printf("plan: %s — %lld layers (%lld dense), hidden %lld, %lld routed experts of %lld (top %lld), %lld MTP\n",
           is_v3 ? "DeepSeek-V3" : config, (long long)c.num_hidden_layers, (long long)c.first_k_dense_replace,
           (long long)c.hidden_size, (long long)c.n_routed_experts, (long long)c.moe_intermediate_size,
           (long long)c.num_experts_per_tok, (long long)c.num_nextn_predict_layers);
    printf("cluster: %.0f nodes x %.0f GPUs, PP %.0f, EP %.0f, node limit %.0f, NVLink %.0f GB/s, IB %.0f GB/s, peak %.1f "
           "TFLOP/s, sequence %.0f\n",
           k.nodes, k.gpn, k.pp, k.ep, k.node_limit, k.nvlink, k.ib, k.peak, k.seq);
    printf("per token\n");
    line("parameters, total (main model)", n.total, "", is_v3 ? PUB_V3_TOTAL : 0, "V3 paper §4.2: 671B");
    line("parameters, active (multiplied by)", n.active, "", is_v3 ? PUB_V3_ACTIVE : 0, "weights README 36.7B; paper 37B");
    line("parameters, active + embedding table", n.active + n.embedding, "", 0, "");
    line("parameters, MTP modules (own)", n.mtp, "", is_v3 ? PUB_V3_MTP : 0, "weights README: 11.5B");
    line("training FLOPs (main model)", f_main, "FLOP", is_v3 ? PUB_V3_FLOPS : 0, "V3 hardware paper, Table 2: 250 GFLOPs");
    line("training FLOPs (with MTP)", f_all, "FLOP", 0, "");
    line("KV cache, BF16 (absorbed MLA)", kv, "B", is_v3 ? PUB_V3_KV : 0, "70.272 KB");
    line("all-to-all over InfiniBand (fwd + bwd)", ib, "B", 0, "");
    line("all-to-all over NVLink (fwd + bwd)", nvl, "B", 0, "");
    line("  IB time at the stated bandwidth", ib / (k.ib * 1e9), "s", 0, "");
    line("  compute time at peak x MFU, one GPU", f_all / (k.peak * 1e12 * k.mfu), "s", 0, "");
    line("activations of a MoE layer (FP8 recipe)", act_tok, "B", 0, "");
    printf("memory per GPU (GiB): weights, gradients, master weights, moments (ZeRO-1 over %.0f data-parallel ranks)\n",
           gpus / k.pp);
    printf("  V3 precisions (BF16 w, FP32 g and master, BF16 moments)  %7.2f %7.2f %7.2f %7.2f  = %7.2f\n",
           v3m.weights / 1073741824.0, v3m.grads / 1073741824.0, v3m.master / 1073741824.0, v3m.moments / 1073741824.0,
           (v3m.weights + v3m.grads + v3m.master + v3m.moments) / 1073741824.0);
    printf("  moe.h precisions (FP32 w and g, FP32 moments)            %7.2f %7.2f %7.2f %7.2f  = %7.2f\n",
           ours.weights / 1073741824.0, ours.grads / 1073741824.0, ours.master / 1073741824.0, ours.moments / 1073741824.0,
           (ours.weights + ours.grads + ours.master + ours.moments) / 1073741824.0);
    printf("  activations of one %.0f-token sequence in the stage's %.1f layers (FP8 recipe): %.2f GiB\n", k.seq,
           c.num_hidden_layers / k.pp, act_tok * k.seq * c.num_hidden_layers / k.pp / 1073741824.0);
    printf("training %.4g tokens on %.0f GPUs\n", k.tokens, gpus);
    line("GPU-hours at the stated MFU", gpu_hours, "h", is_v3 ? PUB_V3_GPU_HOURS : 0, "V3 paper: 2.664M pre-training");
    if (implied_mfu > 0) line(hours_given ? "MFU the given GPU-hours imply" : "MFU the published GPU-hours imply", implied_mfu, "", 0, "");
    printf("LLaMA-3.1 405B (dense, GQA) at sequence 4096, the hardware paper's comparison\n");
    line("parameters", l_params, "", 405e9, "405B");
    line("training FLOPs", l_flops, "FLOP", PUB_LLAMA_FLOPS, "Table 2: 2,448 GFLOPs");
    line("KV cache, BF16", l_kv, "B", PUB_LLAMA_KV, "516 KB");
    printf("{\"bench\":\"plan\",\"%s\":{\"params_total\":%.0f,\"params_active\":%.0f,"
           "\"train_flops_per_token\":%.6g,\"train_flops_per_token_with_mtp\":%.6g,\"kv_bytes_per_token\":%.0f,"
           "\"implied_mfu\":%.4f},\"llama3_405b\":{\"params_total\":%.0f,\"train_flops_per_token\":%.6g,"
           "\"kv_bytes_per_token\":%.0f}}\n",
           is_v3 ? "deepseek_v3" : "model", n.total, n.active, f_main, f_all, kv, implied_mfu, l_params, l_flops, l_kv);
    moe_ctx_free(ctx);
    return 0;
fail:
    fprintf(stderr, "plan: %s\n", moe_ctx_error(ctx));
    moe_ctx_free(ctx);
    return 1;
}
