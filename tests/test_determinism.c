/* tests/test_determinism.c — a forward + backward pass through every op, run on 1 and on 2
   (and 3) threads, must give bit-identical outputs and gradients. Sizes are chosen above the
   thresholds at which the kernels go parallel, and the row counts are not multiples of the
   reduction chunk. */
/* The split thresholds these shapes were sized against (moe.h's defaults are higher, tuned
   to the cost of waking a thread): the parallel paths must run here. */
#define MOE__PAR_WORK 16384.0
#define MOE__GEMM_MT_FLOPS 3.0e6
#define MOE_IMPLEMENTATION
#include "moe.h"
#include "test.h"

#include <stdlib.h>
#include <string.h>

enum { B = 3, T = 70, H = 4, DK = 24, DV = 16, D = 96, V = 130, NPARAM = 6 };

typedef struct net {
    moe_tensor *emb, *wq, *wk, *wv, *wo, *norm; /* parameters */
    moe_tensor *ids, *targets;
    moe_rope_table rope;
} net;

static moe_tensor *param(moe_ctx *ctx, int ndim, int64_t d0, int64_t d1, uint64_t stream, float std) {
    int64_t shape[2] = {d0, d1};
    moe_tensor *t = NULL;
    moe_rng rng = moe_rng_new(5, stream);
    moe_tensor_new(ctx, MOE_F32, ndim, shape, &t);
    moe_tensor_fill_normal(ctx, t, &rng, ndim == 1 ? 1.0f : 0.0f, std);
    moe_tensor_set_requires_grad(ctx, t, 1);
    return t;
}

static void net_init(moe_ctx *ctx, net *n) {
    int64_t shape[2] = {B, T}, i;
    n->emb = param(ctx, 2, V, D, 1, 1.0f);
    n->wq = param(ctx, 2, H * DK, D, 2, 0.1f);
    n->wk = param(ctx, 2, H * DK, D, 3, 0.1f);
    n->wv = param(ctx, 2, H * DV, D, 4, 0.1f);
    n->wo = param(ctx, 2, V, H * DV, 5, 3.0f);
    n->norm = param(ctx, 1, D, 0, 6, 0.1f);
    moe_tensor_new(ctx, MOE_I32, 2, shape, &n->ids);
    moe_tensor_new(ctx, MOE_I32, 2, shape, &n->targets);
    for (i = 0; i < B * T; i++) {
        ((int32_t *)n->ids->data)[i] = (int32_t)((i * 37 + 11) % V);
        ((int32_t *)n->targets->data)[i] = (int32_t)((i * 53 + 5) % V);
    }
    moe_rope_table_init(ctx, &n->rope, DK, T, 10000.0, NULL);
}

/* embedding → rmsnorm → q,k,v → rope → attention → swiglu/softmax mix → logits → CE */
static moe_status net_step(moe_ctx *ctx, net *n, moe_tensor **loss) {
    moe_tensor *x, *h, *q, *k, *v, *qr, *kr, *o, *o2, *g, *sw, *sm, *mix, *logits, *tk, *tki;
    int64_t s4q[4] = {B, T, H, DK}, s4v[4] = {B, T, H, DV}, s3[3] = {B, T, H * DV};
    moe_status s;
    moe_ctx_reset(ctx);
    if ((s = moe_embedding(ctx, n->emb, n->ids, &x))) return s;
    if ((s = moe_rmsnorm(ctx, x, n->norm, 1e-6f, &h))) return s;
    if ((s = moe_matmul(ctx, h, n->wq, &q)) || (s = moe_matmul(ctx, h, n->wk, &k)) || (s = moe_matmul(ctx, h, n->wv, &v))) return s;
    if ((s = moe_tensor_view(ctx, q, 4, s4q, 0, &q)) || (s = moe_tensor_view(ctx, k, 4, s4q, 0, &k)) ||
        (s = moe_tensor_view(ctx, v, 4, s4v, 0, &v)))
        return s;
    if ((s = moe_rope(ctx, q, &n->rope, 0, MOE_ROPE_PAIRS, &qr)) || (s = moe_rope(ctx, k, &n->rope, 0, MOE_ROPE_HALVES, &kr))) return s;
    if ((s = moe_attention(ctx, qr, kr, v, 0.2f, &o))) return s;
    if ((s = moe_tensor_view(ctx, o, 3, s3, 0, &o2))) return s;
    if ((s = moe_silu(ctx, o2, &g)) || (s = moe_swiglu(ctx, g, o2, &sw)) || (s = moe_softmax(ctx, o2, &sm))) return s;
    if ((s = moe_mul(ctx, sw, sm, &mix))) return s;
    if ((s = moe_matmul(ctx, mix, n->wo, &logits))) return s;
    if ((s = moe_topk(ctx, logits, 3, &tk, &tki))) return s; /* exercised, not in the loss */
    return moe_cross_entropy(ctx, logits, n->targets, -1, loss);
}

/* Loss and all parameter gradients after one step at `threads`, appended to out. */
static double *run(int threads, moe_dtype precision, double *loss_out) {
    moe_ctx *ctx = NULL;
    net n;
    moe_tensor *loss, **p;
    double *out;
    size_t total = 0, at = 0;
    int i;
    moe_ctx_new(&ctx);
    moe_ctx_set_threads(ctx, threads);
    moe_ctx_set_gemm_precision(ctx, precision);
    net_init(ctx, &n);
    p = &n.emb;
    for (i = 0; i < NPARAM; i++) total += (size_t)p[i]->numel;
    out = (double *)malloc(total * sizeof(double));
    if (net_step(ctx, &n, &loss) != MOE_OK || moe_backward(ctx, loss) != MOE_OK) {
        fprintf(stderr, "step failed: %s\n", moe_ctx_error(ctx));
        *loss_out = -1;
    } else {
        *loss_out = moe_tensor_get(loss, 0);
    }
    for (i = 0; i < NPARAM; i++) {
        int64_t j;
        for (j = 0; j < p[i]->numel; j++) out[at++] = moe_tensor_get(p[i]->grad, j);
        moe_tensor_free(ctx, p[i]);
    }
    moe_tensor_free(ctx, n.ids);
    moe_tensor_free(ctx, n.targets);
    moe_rope_table_free(&n.rope);
    moe_ctx_free(ctx);
    return out;
}

static void check(moe_dtype precision) {
    double l1, l2, l3, *g1 = run(1, precision, &l1), *g2 = run(2, precision, &l2), *g3 = run(3, precision, &l3);
    size_t total = (size_t)(V * D + 2 * H * DK * D + H * DV * D + V * H * DV + D);
    T_CHECK(l1 > 0, "the step ran");
    T_CHECK(memcmp(&l1, &l2, sizeof l1) == 0 && memcmp(&l1, &l3, sizeof l1) == 0, "loss differs: %.17g %.17g %.17g", l1, l2, l3);
    T_CHECK(memcmp(g1, g2, total * sizeof(double)) == 0, "gradients differ between 1 and 2 threads");
    T_CHECK(memcmp(g1, g3, total * sizeof(double)) == 0, "gradients differ between 1 and 3 threads");
    T_NOTE("%s: loss %.9g, %zu gradient values bit-identical on 1, 2 and 3 threads", moe_dtype_name(precision), l1, total);
    free(g1);
    free(g2);
    free(g3);
}

static void test_fp32_step_1_2_3_threads(void) { check(MOE_F32); }
static void test_bf16_step_1_2_3_threads(void) { check(MOE_BF16); }

int main(void) {
    T_RUN(test_fp32_step_1_2_3_threads);
    T_RUN(test_bf16_step_1_2_3_threads);
    return t_summary();
}
