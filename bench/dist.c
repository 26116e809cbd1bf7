/* bench/dist.c — one data-parallel training step split into compute and communication.

   Every rank trains the same model on its own micro-batch of synthetic tokens: forward and
   backward (compute), moe_model_reduce_grads — the rank-ordered gradient sum and the expert
   loads — plus the small reductions train_tiny makes each step (losses, skip and stop flags)
   (communication), and AdamW (compute).
   Each part is timed per step on every rank; a step's time is the slowest rank's, and the
   table gives the median over the timed steps. The bytes each rank receives per step are the
   ordered sum's by construction (an all-gather of every rank's gradient, G bytes each, then
   the sum in rank order: (P − 1)·G); beside them the cost model's ring all-reduce, the least
   an all-reduce moves per rank, 2·(P − 1)/P·G: the price of bit-identical sums is P/2 times
   that. Expert parallelism is not built yet: its bytes are 0.

   Built with mpicc -DMOE_MPI and started under mpirun (./build.sh bench dist runs np = 1, 2
   and 4; on a 2-core machine 4 ranks oversubscribe the cores, and the table says so); built
   without MOE_MPI it is the one-process row.

     dist [--config tiny|small] [--batch B] [--seq T] [--steps N] [--precision fp32|bf16]

   Last line (rank 0): {"bench":"dist","cpu":…,"cpu_id":…,"np":…,"cores":…,"oversubscribed":…,
   "config":…,"tokens_per_step":…,"compute_ms":…,"comm_ms":…,"comm_share":…,
   "dp_bytes_per_rank":…,"predicted_ring_bytes_per_rank":…,"ep_bytes_per_rank":0} */
#define MOE_IMPLEMENTATION
#include "moe.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bench_cpu.h"

#define FAIL_IF(cond)                                                                         \
    do {                                                                                      \
        if (cond) {                                                                           \
            fprintf(stderr, "dist (rank %d): %s\n", rank, moe_ctx_error(ctx));                 \
            return 1;                                                                         \
        }                                                                                     \
    } while (0)

int main(int argc, char **argv) {
    moe_ctx *ctx = NULL;
    moe_comm *comm = NULL;
    moe_model *m = NULL;
    moe_adamw *opt = NULL;
    moe_adamw_config ac;
    moe_loss_opts lo;
    moe_config c = moe_config_tiny();
    const char *config = "tiny", *precision = "fp32";
    long B = 8, T = 64, steps = 12, s, i;
    int rank = 0, P = 1, a;
    int32_t *tokens;
    double *compute, *commt, grad_bytes, cores;
    bench_cpu cpu;
    char cpu_json[512];
    for (a = 1; a < argc; a++) {
        if (!strcmp(argv[a], "--config") && a + 1 < argc) config = argv[++a];
        else if (!strcmp(argv[a], "--batch") && a + 1 < argc) B = atol(argv[++a]);
        else if (!strcmp(argv[a], "--seq") && a + 1 < argc) T = atol(argv[++a]);
        else if (!strcmp(argv[a], "--steps") && a + 1 < argc) steps = atol(argv[++a]);
        else if (!strcmp(argv[a], "--precision") && a + 1 < argc) precision = argv[++a];
        else {
            fprintf(stderr, "usage: dist [--config tiny|small] [--batch B] [--seq T] [--steps N] [--precision fp32|bf16]\n");
            return 2;
        }
    }
    if (!strcmp(config, "small")) c = moe_config_small();
    else if (strcmp(config, "tiny") != 0) {
        fprintf(stderr, "dist: --config tiny or small\n");
        return 2;
    }
    if (B < 1 || T < 2 || T > c.max_position_embeddings || steps < 3 || (strcmp(precision, "fp32") && strcmp(precision, "bf16"))) {
        fprintf(stderr, "dist: want --batch >= 1, 2 <= --seq <= %lld, --steps >= 3, --precision fp32 or bf16\n",
                (long long)c.max_position_embeddings);
        return 2;
    }
    if (moe_ctx_new(&ctx) != MOE_OK) return 1;
    FAIL_IF(moe_comm_init(ctx, MOE_COMM_DEFAULT, &comm)); /* MPI when built with MOE_MPI */
    rank = moe_comm_rank(comm);
    P = moe_comm_size(comm);
    FAIL_IF(moe_ctx_set_threads(ctx, 1)); /* one thread per rank: ranks are the parallelism */
    FAIL_IF(moe_ctx_set_gemm_precision(ctx, strcmp(precision, "bf16") ? MOE_F32 : MOE_BF16));
    FAIL_IF(moe_comm_check_config(ctx, comm, &c));
    FAIL_IF(moe_model_new(ctx, &c, 1, &m));
    memset(&ac, 0, sizeof ac);
    FAIL_IF(moe_adamw_new(ctx, m, &ac, &opt));
    memset(&lo, 0, sizeof lo);
    lo.mtp_lambda = 0.3f;
    tokens = (int32_t *)malloc(sizeof(int32_t) * (size_t)(B * (T + 1)));
    compute = (double *)malloc(sizeof(double) * (size_t)steps * 2);
    if (!tokens || !compute) return 1;
    commt = compute + steps;
    for (s = 0; s < steps + 2; s++) { /* two warm-up steps, then the timed ones */
        moe_tensor *loss = NULL;
        moe_loss_parts parts;
        double t0, t1, t2, t3, sums[3], times[2];
        int64_t flags[2];
        float gn;
        for (i = 0; i < B * (T + 1); i++) tokens[i] = (int32_t)(((s * P + rank) * 7919 + i * 104729) % c.vocab_size);
        t0 = moe_time_s();
        FAIL_IF(moe_model_loss(ctx, m, tokens, B, T, &lo, &loss, &parts));
        FAIL_IF(moe_backward(ctx, loss));
        moe_ctx_reset(ctx);
        t1 = moe_time_s();
        /* what train_tiny reduces besides the gradients: the logged losses, the decision to skip,
           and (after the step) the decision to stop */
        sums[0] = parts.total;
        sums[1] = parts.main;
        sums[2] = parts.mtp[0];
        flags[0] = 0;
        FAIL_IF(moe_comm_allreduce_ordered(ctx, comm, sums, 3, MOE_COMM_F64));
        FAIL_IF(moe_comm_allreduce(ctx, comm, flags, 1, MOE_COMM_I64, MOE_COMM_MAX));
        FAIL_IF(moe_model_reduce_grads(ctx, m, comm));
        flags[0] = flags[1] = 0;
        FAIL_IF(moe_comm_allreduce(ctx, comm, flags, 2, MOE_COMM_I64, MOE_COMM_MAX));
        t2 = moe_time_s();
        FAIL_IF(moe_adamw_step(ctx, opt, 1e-3f, 1.0f / (float)P, 1.0f, &gn));
        FAIL_IF(moe_model_update_expert_bias(ctx, m, 1e-3f));
        t3 = moe_time_s();
        times[0] = (t1 - t0) + (t3 - t2);
        times[1] = t2 - t1;
        FAIL_IF(moe_comm_allreduce(ctx, comm, times, 2, MOE_COMM_F64, MOE_COMM_MAX)); /* the slowest rank's */
        if (s >= 2) {
            compute[s - 2] = times[0];
            commt[s - 2] = times[1];
        }
    }
    qsort(compute, (size_t)steps, sizeof(double), cmp_double);
    qsort(commt, (size_t)steps, sizeof(double), cmp_double);
    grad_bytes = 0;
    for (i = 0; i < moe_model_tensor_count(m); i++) {
        int is_param = 0;
        moe_tensor *t = moe_model_tensor(m, i, NULL, &is_param);
        if (is_param) grad_bytes += (double)t->numel * sizeof(moe_real);
    }
    cores = (double)sysconf(_SC_NPROCESSORS_ONLN);
    if (rank == 0) {
        double cm = compute[steps / 2] * 1e3, co = commt[steps / 2] * 1e3;
        double got = P > 1 ? (double)(P - 1) * grad_bytes : 0, ring = 2.0 * (P - 1) / P * grad_bytes;
        bench_cpu_read(&cpu);
        printf("CPU: %s (%s), %.0f cores; %d rank%s%s, 1 thread each; %s config, %s, %ld x %ld tokens per rank per step\n",
               cpu.model, cpu.id, cores, P, P > 1 ? "s" : "", P > cores ? " (oversubscribed: more ranks than cores)" : "", config,
               precision, B, T);
        printf("np  compute ms  comm ms  comm share  DP bytes in/rank/step (ordered sum)  cost model: ring all-reduce  EP bytes\n");
        printf("%2d  %10.2f  %7.2f  %9.1f%%  %35.0f  %27.0f  %8d\n", P, cm, co, 100 * co / (cm + co), got, ring, 0);
        printf("{\"bench\":\"dist\",%s,\"np\":%d,\"cores\":%.0f,\"oversubscribed\":%s,\"config\":\"%s\",\"precision\":\"%s\","
               "\"tokens_per_step\":%ld,\"compute_ms\":%.3f,\"comm_ms\":%.3f,\"comm_share\":%.4f,\"dp_bytes_per_rank\":%.0f,"
               "\"predicted_ring_bytes_per_rank\":%.0f,\"ep_bytes_per_rank\":0}\n",
               bench_cpu_json(&cpu, cpu_json, sizeof cpu_json), P, cores, P > cores ? "true" : "false", config, precision,
               B * T * P, cm, co, co / (cm + co), got, ring);
    }
    free(tokens);
    free(compute);
    moe_adamw_free(ctx, opt);
    moe_model_free(ctx, m);
    moe_comm_free(comm);
    moe_ctx_free(ctx);
    return 0;
}
