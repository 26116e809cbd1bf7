/* tests/fuzz/fuzz_hf_index.c — libFuzzer target: model.safetensors.index.json of a Hugging Face
   directory that also holds config.json, model.safetensors and two shards of the nano model;
   moe_model_load_hf on it. Run: ./build.sh fuzz hf_index [SECONDS]. */
#include "fuzz_common.h"

static moe_ctx *g_ctx;
static char g_dir[256], g_path[512];

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    moe_model *m = NULL;
    moe_status s;
    if (!g_ctx) {
        static const char *const files[] = {"config.json", "model.safetensors", "model-00001-of-00002.safetensors",
                                            "model-00002-of-00002.safetensors", "model.safetensors.index.json"};
        if (moe_ctx_new(&g_ctx) != MOE_OK) fuzz_die("moe_ctx_new", NULL);
        snprintf(g_dir, sizeof g_dir, "%s", fuzz_scratch("hf_index", files, 5));
        if (fuzz_hf_dir(g_ctx, g_dir, 0, 1, NULL, 0) != MOE_OK) fuzz_die("writing the HF directory", g_ctx);
        snprintf(g_path, sizeof g_path, "%s/model.safetensors.index.json", g_dir);
    }
    fuzz_write(g_path, data, size);
    s = moe_model_load_hf(g_ctx, g_dir, &m);
    fuzz_refused(g_ctx, s, "moe_model_load_hf");
    if (s != MOE_OK && m) fuzz_die("moe_model_load_hf failed but set *out", NULL);
    moe_model_free(g_ctx, m);
    moe_ctx_reset(g_ctx);
    return 0;
}
