/* bench/moe_scaling.c — cost of one DeepSeekMoE layer (forward + backward) at 4096 tokens as
   the number of routed experts grows 8 → 16 → 32 → 64 with top-k (4), expert width (128)
   and hidden size (256) fixed. A sparse layer should cost what its active parameters cost:
   the ratio t64/t8 stays near 1 while total parameters grow 8×.

   Last line: {"bench":"moe_scaling","cpu":…,"cpu_id":…,"t8_ms":…,"t64_ms":…,"ratio_64_over_8":…} */
#define MOE_IMPLEMENTATION
#include "moe.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench_cpu.h"

/* Median milliseconds of forward + backward of layer 0 (a MoE layer) at 4096 tokens. */
static double time_layer(moe_ctx *ctx, int64_t experts, int reps) {
    moe_config c = moe_config_small();
    moe_model *m = NULL;
    moe_tensor *x = NULL;
    int64_t shape[3] = {16, 256, 256};
    moe_rng rng = moe_rng_new(1, 1);
    double t[16];
    int r;
    c.num_hidden_layers = 1; c.first_k_dense_replace = 0; c.num_nextn_predict_layers = 0;
    c.n_routed_experts = experts; c.num_experts_per_tok = 4; c.n_group = 1; c.topk_group = 1;
    c.moe_intermediate_size = 128; c.hidden_size = 256;
    if (moe_model_new(ctx, &c, 1, &m) || moe_tensor_new(ctx, MOE_F32, 3, shape, &x)) {
        fprintf(stderr, "setup failed: %s\n", moe_ctx_error(ctx));
        exit(1);
    }
    moe_tensor_fill_normal(ctx, x, &rng, 0.0f, 1.0f);
    moe_tensor_set_requires_grad(ctx, x, 1);
    for (r = 0; r < reps + 1; r++) {
        moe_tensor *y = NULL, *aux = NULL, *s = NULL;
        double t0 = moe_time_s();
        if (moe__moe_forward(ctx, &m->layers[0].moe, &m->cfg, 16, 256, 0.0f, x, &y, &aux) || moe_sum(ctx, y, &s) ||
            moe_backward(ctx, s)) {
            fprintf(stderr, "step failed: %s\n", moe_ctx_error(ctx));
            exit(1);
        }
        if (r > 0) t[r - 1] = 1e3 * (moe_time_s() - t0); /* the first run warms caches and the arena */
        moe_ctx_reset(ctx);
    }
    qsort(t, (size_t)reps, sizeof t[0], cmp_double);
    moe_tensor_free(ctx, x);
    moe_model_free(ctx, m);
    return t[reps / 2];
}

int main(int argc, char **argv) {
    moe_ctx *ctx = NULL;
    static const int64_t experts[4] = {8, 16, 32, 64};
    double ms[4];
    int i, reps = argc > 1 && strcmp(argv[1], "--quick") == 0 ? 3 : 9;
    bench_cpu cpu;
    char cpu_json[512];
    bench_cpu_read(&cpu);
    if (moe_ctx_new(&ctx) != MOE_OK) return 1;
    printf("CPU: %s (%s)\n", cpu.model, cpu.id);
    printf("MoE layer forward+backward, 4096 tokens, hidden 256, expert width 128, top-4, %d threads (median of %d)\n",
           moe_ctx_threads(ctx), reps);
    printf("%8s %12s %14s %10s\n", "experts", "ms", "total params", "vs 8");
    for (i = 0; i < 4; i++) {
        ms[i] = time_layer(ctx, experts[i], reps);
        printf("%8lld %12.1f %14lld %10.2f\n", (long long)experts[i], ms[i], (long long)(experts[i] * 3 * 256 * 128), ms[i] / ms[0]);
    }
    printf("{\"bench\":\"moe_scaling\",%s,\"t8_ms\":%.2f,\"t64_ms\":%.2f,\"ratio_64_over_8\":%.3f}\n",
           bench_cpu_json(&cpu, cpu_json, sizeof cpu_json), ms[0], ms[3], ms[3] / ms[0]);
    moe_ctx_free(ctx);
    return 0;
}
