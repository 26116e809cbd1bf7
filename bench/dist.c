/* bench/dist.c — one data- (and expert-) parallel training step split into compute and
   communication.

   Every rank trains the same model on its own micro-batch of synthetic tokens: forward and
   backward (compute; with --ep N the MoE layers' exchanges happen inside it and are timed
   there), moe_model_reduce_grads — the rank-ordered gradient sum and the expert loads — plus
   the small reductions train_tiny makes each step (losses, skip and stop flags)
   (communication), and AdamW (compute). Each part is timed per step on every rank; a step's
   time is the slowest rank's, and the table gives the median over the timed steps.

   Bytes are counted, not assumed: moe_comm_bytes_received of the world (data parallelism) and
   of the EP and EDP groups (expert parallelism), per step, the mean over the timed steps and
   over the ranks. Beside them the cost model's figures for the same config:
   - DP: a ring all-reduce, the least an all-reduce moves per rank, 2·(P − 1)/P·G for G bytes
     of gradients; the ordered sum moves (P − 1)·G (an all-gather, then the sum in rank order):
     the price of bit-identical sums is P/2 times the ring.
   - EP: each MoE layer sends a (token, expert) row to another rank with probability
     (N − 1)/N under uniform routing (N = EP size), (4d + 2)·4 bytes in all per such row —
     forward: the input and the output (d each); backward: output gradient and gate out
     (d + 1), input and gate gradients back (d + 1); the owner kept the input — plus, with EDP
     groups of R > 1 ranks,
     R − 1 broadcasts of the layer's local expert gradients (the rank-ordered chain), each
     received by R − 1 ranks: (R − 1)²/R of them per rank. Real routing is not uniform (the
     loads of an untrained router least of all), so the measured EP bytes fall below it.

   Built with mpicc -DMOE_MPI and started under mpirun (./build.sh bench dist runs np = 1, 2
   and 4, then EP = np on 2 and 4; on a 2-core machine 4 ranks oversubscribe the cores, and
   the table says so); built without MOE_MPI it is the one-process row.

     dist [--config tiny|small] [--batch B] [--seq T] [--steps N] [--precision fp32|bf16] [--ep N]

   Last line (rank 0): {"bench":"dist","cpu":…,"cpu_id":…,"np":…,"ep":…,"cores":…,"oversubscribed":…,
   "config":…,"tokens_per_step":…,"compute_ms":…,"comm_ms":…,"comm_share":…,
   "dp_bytes_per_rank":…,"predicted_ring_bytes_per_rank":…,"ep_bytes_per_rank":…,
   "predicted_ep_bytes_per_rank":…} */
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
    moe_comm *comm = NULL, *ep_comm = NULL, *edp_comm = NULL;
    moe_model *m = NULL;
    moe_adamw *opt = NULL;
    moe_adamw_config ac;
    moe_loss_opts lo;
    moe_config c = moe_config_tiny();
    const char *config = "tiny", *precision = "fp32";
    long B = 8, T = 64, steps = 12, ep = 1, s, i;
    int rank = 0, P = 1, a;
    int32_t *tokens;
    double *compute, *commt, grad_bytes, cores, dp_bytes = 0, ep_bytes = 0;
    bench_cpu cpu;
    char cpu_json[512];
    for (a = 1; a < argc; a++) {
        if (!strcmp(argv[a], "--config") && a + 1 < argc) config = argv[++a];
        else if (!strcmp(argv[a], "--batch") && a + 1 < argc) B = atol(argv[++a]);
        else if (!strcmp(argv[a], "--seq") && a + 1 < argc) T = atol(argv[++a]);
        else if (!strcmp(argv[a], "--steps") && a + 1 < argc) steps = atol(argv[++a]);
        else if (!strcmp(argv[a], "--precision") && a + 1 < argc) precision = argv[++a];
        else if (!strcmp(argv[a], "--ep") && a + 1 < argc) ep = atol(argv[++a]);
        else {
            fprintf(stderr, "usage: dist [--config tiny|small] [--batch B] [--seq T] [--steps N] [--precision fp32|bf16] [--ep N]\n");
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
    if (ep < 1 || P % ep != 0) {
        fprintf(stderr, "dist: --ep %ld does not divide the %d ranks\n", ep, P);
        return 2;
    }
    if (ep > 1) { /* EP groups of consecutive ranks, EDP groups of the same place in each (as train_tiny) */
        FAIL_IF(moe_comm_split(ctx, comm, rank / (int)ep, rank, &ep_comm));
        FAIL_IF(moe_comm_split(ctx, comm, rank % (int)ep, rank, &edp_comm));
        FAIL_IF(moe_model_expert_parallel(ctx, m, ep_comm, P > ep ? edp_comm : NULL));
    }
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
        int64_t flags[2], dp0 = moe_comm_bytes_received(comm), ep0 = moe_comm_bytes_received(ep_comm) + moe_comm_bytes_received(edp_comm);
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
            dp_bytes += (double)(moe_comm_bytes_received(comm) - dp0) / (double)steps;
            ep_bytes += (double)(moe_comm_bytes_received(ep_comm) + moe_comm_bytes_received(edp_comm) - ep0) / (double)steps;
        }
    }
    {   /* the bytes: the mean over the ranks */
        double b[2];
        b[0] = dp_bytes;
        b[1] = ep_bytes;
        FAIL_IF(moe_comm_allreduce(ctx, comm, b, 2, MOE_COMM_F64, MOE_COMM_SUM));
        dp_bytes = b[0] / P;
        ep_bytes = b[1] / P;
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
        double cm = compute[steps / 2] * 1e3, co = commt[steps / 2] * 1e3, ring = 2.0 * (P - 1) / P * grad_bytes;
        double moe_layers = (double)(c.num_hidden_layers - c.first_k_dense_replace + c.num_nextn_predict_layers), d = (double)c.hidden_size;
        double remote_rows = (double)(B * T) * (double)c.num_experts_per_tok * (double)(ep - 1) / (double)ep;
        double local_wgrad = (double)c.n_routed_experts / (double)ep * 3.0 * (double)c.moe_intermediate_size * d * sizeof(moe_real);
        double R = (double)(P / ep), ep_pred = ep > 1 ? moe_layers * (remote_rows * (4 * d + 2) * sizeof(moe_real) + (R - 1) * (R - 1) / R * local_wgrad) : 0;
        bench_cpu_read(&cpu);
        printf("CPU: %s (%s), %.0f cores; %d rank%s%s, 1 thread each; %s config, %s, %ld x %ld tokens per rank per step\n",
               cpu.model, cpu.id, cores, P, P > 1 ? "s" : "", P > cores ? " (oversubscribed: more ranks than cores)" : "", config,
               precision, B, T);
        printf("np  EP  compute ms  comm ms  comm share  DP bytes in/rank/step  cost model (ring)  EP bytes in/rank/step  cost model (EP)\n");
        printf("%2d  %2ld  %10.2f  %7.2f  %9.1f%%  %21.0f  %17.0f  %21.0f  %15.0f\n", P, ep, cm, co, 100 * co / (cm + co), dp_bytes, ring,
               ep_bytes, ep_pred);
        printf("{\"bench\":\"dist\",%s,\"np\":%d,\"ep\":%ld,\"cores\":%.0f,\"oversubscribed\":%s,\"config\":\"%s\",\"precision\":\"%s\","
               "\"tokens_per_step\":%ld,\"compute_ms\":%.3f,\"comm_ms\":%.3f,\"comm_share\":%.4f,\"dp_bytes_per_rank\":%.0f,"
               "\"predicted_ring_bytes_per_rank\":%.0f,\"ep_bytes_per_rank\":%.0f,\"predicted_ep_bytes_per_rank\":%.0f}\n",
               bench_cpu_json(&cpu, cpu_json, sizeof cpu_json), P, ep, cores, P > cores ? "true" : "false", config, precision,
               B * T * P, cm, co, co / (cm + co), dp_bytes, ring, ep_bytes, ep_pred);
    }
    free(tokens);
    free(compute);
    moe_adamw_free(ctx, opt);
    moe_model_expert_parallel(ctx, m, NULL, NULL);
    moe_model_free(ctx, m);
    moe_comm_free(edp_comm);
    moe_comm_free(ep_comm);
    moe_comm_free(comm);
    moe_ctx_free(ctx);
    return 0;
}
