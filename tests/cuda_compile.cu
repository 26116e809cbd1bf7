/* tests/cuda_compile.cu — the CUDA build of moe.h: compiled for sm_90a with warnings as
   errors by build.sh whenever nvcc is present (it cannot run on a machine without a GPU). */
#define MOE_IMPLEMENTATION
#include "moe.h"

int main(void) {
    moe_ctx *ctx = NULL;
    int n = 0;
    if (moe_ctx_new(&ctx) != MOE_OK) return 1;
    moe_cuda_device_count(ctx, &n);
    moe_ctx_free(ctx);
    return n >= 0 ? 0 : 1;
}
