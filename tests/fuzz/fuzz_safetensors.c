/* tests/fuzz/fuzz_safetensors.c — libFuzzer target: a safetensors file image, header and data,
   through moe_st_open_memory. An image that opens must be self-consistent: every tensor found
   by its own name (names unique), its first and last element and last byte readable (ASan
   checks the bounds). Build and run: ./build.sh fuzz safetensors [SECONDS]. */
#include "fuzz_common.h"

static moe_ctx *g_ctx;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    moe_st_file *f = NULL;
    moe_status s;
    if (!g_ctx && moe_ctx_new(&g_ctx) != MOE_OK) fuzz_die("moe_ctx_new", NULL);
    s = moe_st_open_memory(g_ctx, data, size, &f);
    fuzz_refused(g_ctx, s, "moe_st_open_memory");
    if (s != MOE_OK && f) fuzz_die("moe_st_open_memory failed but set *out", NULL);
    if (s == MOE_OK) {
        int64_t i, n = moe_st_count(f);
        for (i = 0; i < n; i++) {
            const moe_st_tensor *t = moe_st_get(f, i);
            volatile float v;
            volatile unsigned char b;
            if (!t || moe_st_find(f, t->name) != t) fuzz_die("a tensor is not found under its own name", NULL);
            if (t->numel > 0) {
                v = moe_st_value(t, 0);
                v = moe_st_value(t, t->numel - 1);
                (void)v;
            }
            if (t->bytes) {
                b = ((const unsigned char *)t->data)[t->bytes - 1];
                (void)b;
            }
        }
        moe_st_close(f);
    }
    moe_ctx_reset(g_ctx);
    return 0;
}
