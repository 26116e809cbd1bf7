/* tests/fuzz/fuzz_distill.c — libFuzzer target: a teacher top-k cache file through
   moe_distill_cache_open and moe_distill_cache_read (the first records and the last one).
   The build defines FUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION, so the file checksum is not
   enforced and the record checks behind it are reached. Run: ./build.sh fuzz distill. */
#include "fuzz_common.h"

static moe_ctx *g_ctx;
static char g_path[512];

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    moe_distill_cache *c = NULL;
    moe_status s;
    if (!g_ctx) {
        static const char *const files[] = {"teacher.bin"};
        if (moe_ctx_new(&g_ctx) != MOE_OK) fuzz_die("moe_ctx_new", NULL);
        snprintf(g_path, sizeof g_path, "%s/teacher.bin", fuzz_scratch("distill", files, 1));
    }
    fuzz_write(g_path, data, size);
    s = moe_distill_cache_open(g_ctx, g_path, &c);
    fuzz_refused(g_ctx, s, "moe_distill_cache_open");
    if (s == MOE_OK) {
        moe_distill_info info = moe_distill_cache_info(c);
        moe_tensor *ids, *logp, *tail;
        int64_t rows = info.count < 4 ? info.count : 4;
        if (rows > 0) {
            s = moe_distill_cache_read(g_ctx, c, 0, rows, &ids, &logp, &tail);
            fuzz_refused(g_ctx, s, "moe_distill_cache_read");
            s = moe_distill_cache_read(g_ctx, c, info.count - 1, 1, &ids, &logp, &tail);
            fuzz_refused(g_ctx, s, "moe_distill_cache_read");
        }
        if (moe_distill_cache_read(g_ctx, c, info.count, 1, &ids, &logp, &tail) == MOE_OK)
            fuzz_die("a record past the end was read", NULL);
        moe_distill_cache_close(c);
    } else if (c) {
        fuzz_die("moe_distill_cache_open failed but set *out", NULL);
    }
    moe_ctx_reset(g_ctx);
    return 0;
}
