/* tests/fuzz/fuzz_hf_weights.c — libFuzzer target: model.safetensors of a Hugging Face directory
   whose config.json describes the nano model with FP8 blocks of 4; moe_model_load_hf on it
   (names, exact shapes of every tensor and fused stack, dtypes, FP8 scales, non-finite
   values). Every weight of a model that loads must be finite. Run: ./build.sh fuzz hf_weights. */
#include "fuzz_common.h"

#include <math.h>

static moe_ctx *g_ctx;
static char g_dir[256], g_path[512];

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    moe_model *m = NULL;
    moe_status s;
    if (!g_ctx) {
        static const char *const files[] = {"config.json", "model.safetensors"};
        if (moe_ctx_new(&g_ctx) != MOE_OK) fuzz_die("moe_ctx_new", NULL);
        snprintf(g_dir, sizeof g_dir, "%s", fuzz_scratch("hf_weights", files, 2));
        if (fuzz_hf_dir(g_ctx, g_dir, 1, 0, NULL, 0) != MOE_OK) fuzz_die("writing the HF directory", g_ctx);
        snprintf(g_path, sizeof g_path, "%s/model.safetensors", g_dir);
    }
    fuzz_write(g_path, data, size);
    s = moe_model_load_hf(g_ctx, g_dir, &m);
    fuzz_refused(g_ctx, s, "moe_model_load_hf");
    if (s != MOE_OK && m) fuzz_die("moe_model_load_hf failed but set *out", NULL);
    if (s == MOE_OK) { /* what loads is finite: NaN and Inf are refused with the tensor's name */
        int64_t i, k;
        for (i = 0; i < moe_model_tensor_count(m); i++) {
            moe_tensor *t = moe_model_tensor(m, i, NULL, NULL);
            for (k = 0; k < t->numel; k++)
                if (!isfinite(moe_tensor_get(t, k))) fuzz_die("a non-finite weight was loaded", NULL);
        }
    }
    moe_model_free(g_ctx, m);
    moe_ctx_reset(g_ctx);
    return 0;
}
