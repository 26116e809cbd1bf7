/* bench/bench_flops.h — the model FLOPs of a training step, for MFU (bench/train_step.c on
   the CPU, bench/gpu.cu on a GPU): the matmul FLOPs of the active path (every linear layer a
   token runs through: attention projections, router, shared and top-k routed experts, dense
   FFNs, MTP modules, output heads) plus causal attention (QKᵀ and PV at (T+1)/2 keys a query
   on average), times 3 for forward + backward (gpu.md §7.4; no recomputation counted).
   Embeddings are lookups: not counted. */
#ifndef MOE_BENCH_FLOPS_H
#define MOE_BENCH_FLOPS_H

static double linear_flops(int64_t in, int64_t out) { return 2.0 * (double)in * (double)out; }

static double block_flops(const moe_config *c, int is_moe, int64_t T) {
    int64_t d = c->hidden_size, H = c->num_attention_heads, dqk = c->qk_nope_head_dim + c->qk_rope_head_dim, I = c->moe_intermediate_size;
    double f = 0;
    if (c->q_lora_rank > 0) f += linear_flops(d, c->q_lora_rank) + linear_flops(c->q_lora_rank, H * dqk);
    else f += linear_flops(d, H * dqk);
    f += linear_flops(d, c->kv_lora_rank + c->qk_rope_head_dim) + linear_flops(c->kv_lora_rank, H * (c->qk_nope_head_dim + c->v_head_dim));
    f += linear_flops(H * c->v_head_dim, d);
    f += 2.0 * (double)H * (double)(dqk + c->v_head_dim) * (double)(T + 1) / 2.0; /* causal: (T+1)/2 keys on average */
    if (is_moe)
        f += linear_flops(d, c->n_routed_experts) + (double)(c->num_experts_per_tok + c->n_shared_experts) * 3.0 * linear_flops(d, I);
    else
        f += 3.0 * linear_flops(d, c->intermediate_size);
    return f;
}

/* Forward FLOPs per token of the main model and the MTP modules (each MTP depth k runs on
   T-k of the T tokens), times 3 for training. */
static double step_flops(const moe_config *c, int64_t B, int64_t T, int mtp) {
    double per_tok = 0, total;
    int64_t L, k;
    for (L = 0; L < c->num_hidden_layers; L++) per_tok += block_flops(c, L >= c->first_k_dense_replace, T);
    per_tok += linear_flops(c->hidden_size, c->vocab_size);
    total = per_tok * (double)(B * T);
    for (k = 1; mtp && k <= c->num_nextn_predict_layers; k++)
        total += (double)(B * (T - k)) * (block_flops(c, 1, T - k) + linear_flops(2 * c->hidden_size, c->hidden_size) +
                                          linear_flops(c->hidden_size, c->vocab_size));
    return 3.0 * total;
}

#endif
