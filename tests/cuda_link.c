/* tests/cuda_link.c — a C99 program compiled by gcc against moe.h's declarations with
   MOE_CUDA, linked with the nvcc-compiled implementation (tests/cuda_impl.cu) and cudart,
   cuBLASLt and NCCL: the C-linkage check of gpu.md §7.1. It asks for the GPU the way a user
   does and checks the answer is coherent: with no device, moe_ctx_set_device fails cleanly
   and the context keeps working on the CPU; with one, the context moves there and back. */
#include "moe.h"
#include "test.h"

static void gpu_switch_from_c(void) {
    moe_ctx *ctx = NULL;
    moe_tensor *t = NULL;
    int n = -1;
    moe_status st;
    T_ASSERT(moe_ctx_new(&ctx) == MOE_OK, "moe_ctx_new");
    T_CHECK(moe_cuda_device_count(ctx, &n) == MOE_OK && n >= 0, "device count %d", n);
    st = moe_ctx_set_device(ctx, MOE_DEVICE_CUDA, 0);
    if (n == 0) {
        T_CHECK(st == MOE_ERR_UNSUPPORTED && strstr(moe_ctx_error(ctx), "no CUDA device"), "without a GPU: %s (%s)",
                moe_status_name(st), moe_ctx_error(ctx));
        T_CHECK(moe_ctx_device(ctx) == MOE_DEVICE_CPU, "the context stays on the CPU");
    } else {
        T_CHECK(st == MOE_OK && moe_ctx_device(ctx) == MOE_DEVICE_CUDA, "to the GPU: %s", moe_ctx_error(ctx));
        T_NOTE("%d GPU(s); device 0 is %s", n, moe_cuda_device_name(ctx));
        T_CHECK(moe_ctx_set_device(ctx, MOE_DEVICE_CPU, 0) == MOE_OK, "back to the CPU: %s", moe_ctx_error(ctx));
    }
    {
        int64_t shape[1] = {3};
        T_CHECK(moe_tensor_new(ctx, MOE_F32, 1, shape, &t) == MOE_OK, "a host tensor afterwards: %s", moe_ctx_error(ctx));
        moe_tensor_free(ctx, t);
    }
    moe_ctx_free(ctx);
}

int main(void) {
    T_RUN(gpu_switch_from_c);
    return t_summary();
}
