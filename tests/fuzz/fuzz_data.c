/* tests/fuzz/fuzz_data.c — libFuzzer target: a token file (llm.c shard or raw text) through
   moe_data_load, then a training and a validation batch: every token must lie in the
   vocabulary the loader reports. Run: ./build.sh fuzz data [SECONDS]. */
#include "fuzz_common.h"

static moe_ctx *g_ctx;
static char g_path[512];

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    moe_dataset *d = NULL;
    moe_status s;
    if (!g_ctx) {
        static const char *const files[] = {"tokens.bin"};
        if (moe_ctx_new(&g_ctx) != MOE_OK) fuzz_die("moe_ctx_new", NULL);
        snprintf(g_path, sizeof g_path, "%s/tokens.bin", fuzz_scratch("data", files, 1));
    }
    fuzz_write(g_path, data, size);
    s = moe_data_load(g_ctx, g_path, 0.25, &d);
    fuzz_refused(g_ctx, s, "moe_data_load");
    if (s == MOE_OK) {
        int32_t out[2 * 9];
        int64_t T, i;
        int val;
        if (d->n_train < 2 || d->n_tokens - d->n_train < 2 || d->vocab < 1) fuzz_die("a loaded dataset is too small", NULL);
        for (val = 0; val < 2; val++) {
            int64_t part = val ? d->n_tokens - d->n_train : d->n_train;
            T = part - 1 < 8 ? part - 1 : 8;
            if (moe_data_batch(g_ctx, d, val, 7, 3, 2, T, out) != MOE_OK) fuzz_die("moe_data_batch", g_ctx);
            for (i = 0; i < 2 * (T + 1); i++)
                if (out[i] < 0 || out[i] >= d->vocab) fuzz_die("a token outside the reported vocabulary", NULL);
        }
        moe_data_free(g_ctx, d);
    } else if (d) {
        fuzz_die("moe_data_load failed but set *out", NULL);
    }
    return 0;
}
