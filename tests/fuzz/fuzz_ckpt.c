/* tests/fuzz/fuzz_ckpt.c — libFuzzer target: a checkpoint file through moe_ckpt_config and
   moe_ckpt_load (into the nano model, with an FP32-moment optimizer, a BF16-moment one and
   none), through the public API only: the format may change under it. The seeds are
   checkpoints moe_ckpt_save wrote (tests/fuzz/gen_corpus.c). Run: ./build.sh fuzz ckpt. */
#include "fuzz_common.h"

static moe_ctx *g_ctx;
static moe_model *g_model;
static moe_adamw *g_opt[2];
static char g_path[512];

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    moe_config c;
    moe_train_state st;
    moe_status s;
    int k;
    if (!g_ctx) {
        static const char *const files[] = {"ckpt.bin"};
        moe_config mc = fuzz_nano_config();
        moe_adamw_config oc;
        if (moe_ctx_new(&g_ctx) != MOE_OK || moe_model_new(g_ctx, &mc, 1, &g_model) != MOE_OK) fuzz_die("setup", g_ctx);
        memset(&oc, 0, sizeof oc);
        oc.moment_dtype = MOE_F32;
        if (moe_adamw_new(g_ctx, g_model, &oc, &g_opt[0]) != MOE_OK) fuzz_die("setup", g_ctx);
        oc.moment_dtype = MOE_BF16;
        if (moe_adamw_new(g_ctx, g_model, &oc, &g_opt[1]) != MOE_OK) fuzz_die("setup", g_ctx);
        snprintf(g_path, sizeof g_path, "%s/ckpt.bin", fuzz_scratch("ckpt", files, 1));
    }
    fuzz_write(g_path, data, size);
    s = moe_ckpt_config(g_ctx, g_path, &c);
    fuzz_refused(g_ctx, s, "moe_ckpt_config");
    if (s == MOE_OK && moe_config_validate(g_ctx, &c) != MOE_OK) fuzz_die("a checkpoint's config does not validate", g_ctx);
    for (k = 0; k < 3; k++) {
        s = moe_ckpt_load(g_ctx, g_path, g_model, k < 2 ? g_opt[k] : NULL, &st);
        fuzz_refused(g_ctx, s, "moe_ckpt_load");
    }
    moe_ctx_reset(g_ctx);
    return 0;
}
