/* tests/fuzz/fuzz_config.c — libFuzzer target: config.json text through moe_config_parse. A
   config that parses must validate, save, and load back field for field identical (what
   moe_config_save writes means what was read). Run: ./build.sh fuzz config [SECONDS]. */
#include "fuzz_common.h"

static moe_ctx *g_ctx;
static char g_path[512];

static int same_config(const moe_config *a, const moe_config *b) {
#define F(f) (a->f == b->f)
    return F(vocab_size) && F(hidden_size) && F(intermediate_size) && F(moe_intermediate_size) && F(num_hidden_layers) &&
           F(first_k_dense_replace) && F(num_attention_heads) && F(q_lora_rank) && F(kv_lora_rank) && F(qk_nope_head_dim) &&
           F(qk_rope_head_dim) && F(v_head_dim) && F(n_routed_experts) && F(n_shared_experts) && F(num_experts_per_tok) &&
           F(n_group) && F(topk_group) && F(scoring_func) && F(topk_method) && F(norm_topk_prob) && F(routed_scaling_factor) &&
           F(num_nextn_predict_layers) && F(rope_theta) && F(rope_scaling.factor) && F(rope_scaling.original_max_pos) &&
           F(rope_scaling.beta_fast) && F(rope_scaling.beta_slow) && F(rope_scaling.mscale) && F(rope_scaling.mscale_all_dim) &&
           F(rms_norm_eps) && F(max_position_embeddings) && F(tie_word_embeddings) && F(initializer_range) && F(rope_layout);
#undef F
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    moe_config a, b;
    moe_status s;
    if (!g_ctx) {
        static const char *const files[] = {"config.json"};
        if (moe_ctx_new(&g_ctx) != MOE_OK) fuzz_die("moe_ctx_new", NULL);
        snprintf(g_path, sizeof g_path, "%s/config.json", fuzz_scratch("config", files, 1));
    }
    s = moe_config_parse(g_ctx, (const char *)data, size, &a);
    fuzz_refused(g_ctx, s, "moe_config_parse");
    if (s == MOE_OK) {
        if (moe_config_validate(g_ctx, &a) != MOE_OK) fuzz_die("a parsed config does not validate", g_ctx);
        if (moe_config_save(g_ctx, &a, g_path) != MOE_OK) fuzz_die("a parsed config does not save", g_ctx);
        if (moe_config_load(g_ctx, g_path, &b) != MOE_OK) fuzz_die("a saved config does not load", g_ctx);
        if (!same_config(&a, &b)) fuzz_die("config.json round trip changed the config", NULL);
    }
    moe_ctx_reset(g_ctx);
    return 0;
}
