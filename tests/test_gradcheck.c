/* tests/test_gradcheck.c — every differentiable op against central finite differences.

   Built with -DMOE_REAL_F64, so the whole library computes in double precision. For an op
   y = f(inputs), the test takes the scalar L = Σ y ⊙ R with a fixed random R, gets dL/dx
   from moe_backward, and compares it with (L(x + h) − L(x − h)) / 2h for every element x
   of every input, h = 1e-6.
   Tolerance: central differences in double have truncation error O(h²·|f'''|) ≈ 1e-12 and
   rounding error O(ε·|L|/h) ≈ 1e-10 for |L| ~ 1, so we require
       max |analytic − numeric| ≤ 1e-6 · max(1, max |numeric|),
   four orders of magnitude above the expected error and far below any real bug (a wrong
   term changes gradients by O(1)). Shapes include sizes that are not multiples of the SIMD
   width (8/16), of the attention key tile (64) or of the reduction row chunk (64). */
#define MOE_IMPLEMENTATION
#include "moe.h"
#include "test.h"

#include <math.h>
#include <stdlib.h>

#ifndef MOE_REAL_F64
#error "test_gradcheck must be built with -DMOE_REAL_F64"
#endif

#define MAX_IN 4
typedef moe_status (*fwd_fn)(moe_ctx *ctx, moe_tensor **in, moe_tensor **out, const void *aux);

static moe_ctx *g_ctx;
static uint64_t g_stream = 1;

/* A heap tensor of N(0, 1) values (or the given int ids), optionally requiring grads. */
static moe_tensor *mk(int grad, int ndim, int64_t d0, int64_t d1, int64_t d2, int64_t d3) {
    int64_t shape[4] = {d0, d1, d2, d3};
    moe_tensor *t = NULL;
    moe_rng rng = moe_rng_new(1234, g_stream++);
    if (moe_tensor_new(g_ctx, MOE_F32, ndim, shape, &t) != MOE_OK) return NULL;
    moe_tensor_fill_normal(g_ctx, t, &rng, 0.0f, 1.0f);
    if (grad) moe_tensor_set_requires_grad(g_ctx, t, 1);
    return t;
}
static moe_tensor *mk_ids(int ndim, int64_t d0, int64_t d1, const int32_t *vals) {
    int64_t shape[2] = {d0, d1}, i;
    moe_tensor *t = NULL;
    if (moe_tensor_new(g_ctx, MOE_I32, ndim, shape, &t) != MOE_OK) return NULL;
    for (i = 0; i < t->numel; i++) ((int32_t *)t->data)[i] = vals[i];
    return t;
}

/* L = Σ y ⊙ R, with R drawn once per output shape (same stream every evaluation). */
static moe_status weighted_sum(moe_ctx *ctx, moe_tensor *y, moe_tensor **loss) {
    moe_tensor *r, *p;
    moe_rng rng = moe_rng_new(99, 7);
    moe_status s = moe_tensor_temp(ctx, MOE_F32, y->ndim, y->shape, &r);
    if (s) return s;
    moe_tensor_fill_normal(ctx, r, &rng, 0.0f, 1.0f);
    if ((s = moe_mul(ctx, y, r, &p))) return s;
    return moe_sum(ctx, p, loss);
}

static double eval_loss(fwd_fn f, moe_tensor **in, const void *aux, int *ok) {
    moe_tensor *y, *loss;
    double v;
    moe_ctx_reset(g_ctx);
    if (f(g_ctx, in, &y, aux) || weighted_sum(g_ctx, y, &loss)) {
        *ok = 0;
        return 0;
    }
    v = moe_tensor_get(loss, 0);
    moe_ctx_reset(g_ctx);
    return v;
}

/* Compare analytic and numeric gradients of every input that requires them. */
static void gradcheck(const char *label, fwd_fn f, moe_tensor **in, int n_in, const void *aux) {
    const double h = 1e-6, tol = 1e-6;
    moe_tensor *y, *loss;
    int k, ok = 1;
    moe_status s;
    for (k = 0; k < n_in; k++) moe_tensor_zero_grad(in[k]);
    moe_ctx_reset(g_ctx);
    s = f(g_ctx, in, &y, aux);
    T_ASSERT(s == MOE_OK, "%s: forward failed: %s", label, moe_ctx_error(g_ctx));
    s = weighted_sum(g_ctx, y, &loss);
    T_ASSERT(s == MOE_OK, "%s: loss failed: %s", label, moe_ctx_error(g_ctx));
    s = moe_backward(g_ctx, loss);
    T_ASSERT(s == MOE_OK, "%s: backward failed: %s", label, moe_ctx_error(g_ctx));
    moe_ctx_reset(g_ctx);
    moe_ctx_set_grad_enabled(g_ctx, 0);
    for (k = 0; k < n_in; k++) {
        moe_tensor *x = in[k];
        double max_err = 0, max_num = 0;
        int64_t i;
        if (!x || !x->requires_grad) continue;
        for (i = 0; i < x->numel; i++) {
            double *xv = (double *)x->data, saved = xv[i], lp, lm, num, ana;
            xv[i] = saved + h;
            lp = eval_loss(f, in, aux, &ok);
            xv[i] = saved - h;
            lm = eval_loss(f, in, aux, &ok);
            xv[i] = saved;
            num = (lp - lm) / (2 * h);
            ana = ((double *)x->grad->data)[i];
            if (fabs(ana - num) > max_err) max_err = fabs(ana - num);
            if (fabs(num) > max_num) max_num = fabs(num);
        }
        T_CHECK(ok, "%s: a perturbed forward failed: %s", label, moe_ctx_error(g_ctx));
        T_CHECK(max_err <= tol * (max_num > 1 ? max_num : 1), "%s input %d: max |analytic - numeric| = %.3g (max |grad| %.3g)",
                label, k, max_err, max_num);
        T_NOTE("%-28s input %d: %5lld elems, max err %.2e (tol %.0e x max(1, %.2g))", label, k, (long long)x->numel,
               max_err, tol, max_num);
    }
    moe_ctx_set_grad_enabled(g_ctx, 1);
}

static void free_all(moe_tensor **in, int n) {
    int i;
    for (i = 0; i < n; i++) moe_tensor_free(g_ctx, in[i]);
}

/* ---- forward functions under test ---- */
static moe_status f_matmul(moe_ctx *c, moe_tensor **in, moe_tensor **y, const void *a) { (void)a; return moe_matmul(c, in[0], in[1], y); }
static moe_status f_add(moe_ctx *c, moe_tensor **in, moe_tensor **y, const void *a) { (void)a; return moe_add(c, in[0], in[1], y); }
static moe_status f_mul(moe_ctx *c, moe_tensor **in, moe_tensor **y, const void *a) { (void)a; return moe_mul(c, in[0], in[1], y); }
static moe_status f_scale(moe_ctx *c, moe_tensor **in, moe_tensor **y, const void *a) { (void)a; return moe_scale(c, in[0], -1.75f, y); }
static moe_status f_sum(moe_ctx *c, moe_tensor **in, moe_tensor **y, const void *a) { (void)a; return moe_sum(c, in[0], y); }
static moe_status f_rmsnorm(moe_ctx *c, moe_tensor **in, moe_tensor **y, const void *a) { (void)a; return moe_rmsnorm(c, in[0], in[1], 1e-6f, y); }
static moe_status f_silu(moe_ctx *c, moe_tensor **in, moe_tensor **y, const void *a) { (void)a; return moe_silu(c, in[0], y); }
static moe_status f_swiglu(moe_ctx *c, moe_tensor **in, moe_tensor **y, const void *a) { (void)a; return moe_swiglu(c, in[0], in[1], y); }
static moe_status f_softmax(moe_ctx *c, moe_tensor **in, moe_tensor **y, const void *a) { (void)a; return moe_softmax(c, in[0], y); }
static moe_status f_embedding(moe_ctx *c, moe_tensor **in, moe_tensor **y, const void *a) { (void)a; return moe_embedding(c, in[0], in[1], y); }
static moe_status f_gather(moe_ctx *c, moe_tensor **in, moe_tensor **y, const void *a) { (void)a; return moe_gather(c, in[0], in[1], y); }
static moe_status f_xent(moe_ctx *c, moe_tensor **in, moe_tensor **y, const void *a) { (void)a; return moe_cross_entropy(c, in[0], in[1], -100, y); }

typedef struct rope_aux { moe_rope_table *table; int64_t pos0; moe_rope_layout layout; } rope_aux;
static moe_status f_rope(moe_ctx *c, moe_tensor **in, moe_tensor **y, const void *a) {
    const rope_aux *r = (const rope_aux *)a;
    return moe_rope(c, in[0], r->table, r->pos0, r->layout, y);
}
static moe_status f_attention(moe_ctx *c, moe_tensor **in, moe_tensor **y, const void *a) {
    return moe_attention(c, in[0], in[1], in[2], *(const float *)a, y);
}
static moe_status f_topk(moe_ctx *c, moe_tensor **in, moe_tensor **y, const void *a) {
    moe_tensor *idx;
    return moe_topk(c, in[0], *(const int64_t *)a, y, &idx);
}
static moe_status f_scatter(moe_ctx *c, moe_tensor **in, moe_tensor **y, const void *a) {
    return moe_scatter_add(c, in[0], in[1], *(const int64_t *)a, y);
}
static moe_status f_concat(moe_ctx *c, moe_tensor **in, moe_tensor **y, const void *a) {
    return moe_concat(c, in[0], in[1], *(const int *)a, y);
}
/* split, then join the parts in swapped order so that the result is not the identity */
static moe_status f_split(moe_ctx *c, moe_tensor **in, moe_tensor **y, const void *a) {
    const int64_t *p = (const int64_t *)a;
    moe_tensor *x0, *x1;
    moe_status s = moe_split(c, in[0], (int)p[0], p[1], &x0, &x1);
    return s ? s : moe_concat(c, x1, x0, (int)p[0], y);
}
/* a view of an op output and a view of a parameter, both reaching their bases */
static moe_status f_view(moe_ctx *c, moe_tensor **in, moe_tensor **y, const void *a) {
    int64_t shape[2] = {3, 4};
    moe_tensor *t, *v1, *v2;
    moe_status s;
    (void)a;
    if ((s = moe_silu(c, in[0], &t))) return s;
    if ((s = moe_tensor_view(c, t, 2, shape, 5, &v1))) return s;
    if ((s = moe_tensor_view(c, in[1], 2, shape, 2, &v2))) return s;
    return moe_mul(c, v1, v2, y);
}

/* ---- cases ---- */

static void test_matmul(void) {
    moe_tensor *in[2];
    in[0] = mk(1, 3, 3, 5, 7, 0); in[1] = mk(1, 2, 9, 7, 0, 0);
    gradcheck("matmul [3,5,7]x[9,7]^T", f_matmul, in, 2, NULL); free_all(in, 2);
    in[0] = mk(1, 2, 19, 33, 0, 0); in[1] = mk(1, 2, 17, 33, 0, 0);
    gradcheck("matmul [19,33]x[17,33]^T", f_matmul, in, 2, NULL); free_all(in, 2);
    in[0] = mk(1, 3, 2, 4, 5, 0); in[1] = mk(1, 3, 2, 3, 5, 0);
    gradcheck("matmul batched [2,4,5]x[2,3,5]", f_matmul, in, 2, NULL); free_all(in, 2);
}
static void test_elementwise(void) {
    moe_tensor *in[2];
    in[0] = mk(1, 2, 4, 6, 0, 0); in[1] = mk(1, 2, 4, 6, 0, 0);
    gradcheck("add [4,6]+[4,6]", f_add, in, 2, NULL); free_all(in, 2);
    in[0] = mk(1, 2, 70, 3, 0, 0); in[1] = mk(1, 1, 3, 0, 0, 0);
    gradcheck("add broadcast [70,3]+[3]", f_add, in, 2, NULL); free_all(in, 2);
    in[0] = mk(1, 2, 3, 5, 0, 0); in[1] = mk(1, 2, 3, 5, 0, 0);
    gradcheck("mul [3,5]", f_mul, in, 2, NULL); free_all(in, 2);
    in[0] = mk(1, 3, 2, 3, 17, 0); in[1] = mk(1, 3, 2, 3, 17, 0);
    gradcheck("mul [2,3,17]", f_mul, in, 2, NULL); free_all(in, 2);
    in[0] = mk(1, 1, 7, 0, 0, 0);
    gradcheck("scale [7]", f_scale, in, 1, NULL); free_all(in, 1);
    in[0] = mk(1, 2, 3, 9, 0, 0);
    gradcheck("scale [3,9]", f_scale, in, 1, NULL);
    gradcheck("sum [3,9]", f_sum, in, 1, NULL); free_all(in, 1);
    in[0] = mk(1, 2, 3, 11, 0, 0);
    gradcheck("silu [3,11]", f_silu, in, 1, NULL); free_all(in, 1);
    in[0] = mk(1, 1, 69, 0, 0, 0);
    gradcheck("silu [69]", f_silu, in, 1, NULL); free_all(in, 1);
    in[0] = mk(1, 2, 4, 7, 0, 0); in[1] = mk(1, 2, 4, 7, 0, 0);
    gradcheck("swiglu [4,7]", f_swiglu, in, 2, NULL); free_all(in, 2);
    in[0] = mk(1, 3, 2, 5, 17, 0); in[1] = mk(1, 3, 2, 5, 17, 0);
    gradcheck("swiglu [2,5,17]", f_swiglu, in, 2, NULL); free_all(in, 2);
}
static void test_rmsnorm(void) {
    moe_tensor *in[2];
    in[0] = mk(1, 2, 5, 9, 0, 0); in[1] = mk(1, 1, 9, 0, 0, 0);
    gradcheck("rmsnorm [5,9]", f_rmsnorm, in, 2, NULL); free_all(in, 2);
    in[0] = mk(1, 3, 2, 67, 5, 0); in[1] = mk(1, 1, 5, 0, 0, 0); /* 134 rows: three row chunks */
    gradcheck("rmsnorm [2,67,5]", f_rmsnorm, in, 2, NULL); free_all(in, 2);
}
static void test_softmax(void) {
    moe_tensor *in[1];
    in[0] = mk(1, 2, 3, 7, 0, 0);
    gradcheck("softmax [3,7]", f_softmax, in, 1, NULL); free_all(in, 1);
    in[0] = mk(1, 3, 2, 3, 33, 0);
    gradcheck("softmax [2,3,33]", f_softmax, in, 1, NULL); free_all(in, 1);
}
static void test_rope(void) {
    moe_tensor *in[1];
    moe_rope_table tab, tab_yarn;
    moe_yarn yarn = {4.0, 16, 32.0, 1.0, 1.0, 1.0};
    rope_aux a;
    T_ASSERT(moe_rope_table_init(g_ctx, &tab, 8, 64, 10000.0, NULL) == MOE_OK, "table: %s", moe_ctx_error(g_ctx));
    T_ASSERT(moe_rope_table_init(g_ctx, &tab_yarn, 6, 64, 10000.0, &yarn) == MOE_OK, "yarn table: %s", moe_ctx_error(g_ctx));
    a.table = &tab; a.pos0 = 0; a.layout = MOE_ROPE_PAIRS;
    in[0] = mk(1, 4, 2, 5, 3, 8);
    gradcheck("rope pairs [2,5,3,8]", f_rope, in, 1, &a);
    a.layout = MOE_ROPE_HALVES;
    gradcheck("rope halves [2,5,3,8]", f_rope, in, 1, &a); free_all(in, 1);
    a.table = &tab_yarn; a.pos0 = 40; a.layout = MOE_ROPE_PAIRS;
    in[0] = mk(1, 3, 7, 2, 6, 0);
    gradcheck("rope yarn pairs [7,2,6] pos 40", f_rope, in, 1, &a); free_all(in, 1);
    moe_rope_table_free(&tab);
    moe_rope_table_free(&tab_yarn);
}
static void test_attention(void) {
    moe_tensor *in[3];
    float scale = 0.4f;
    in[0] = mk(1, 4, 2, 5, 3, 6); in[1] = mk(1, 4, 2, 5, 3, 6); in[2] = mk(1, 4, 2, 5, 3, 4);
    gradcheck("attention [2,5,3,6|4]", f_attention, in, 3, &scale); free_all(in, 3);
    /* 70 tokens: two key tiles of the online softmax */
    in[0] = mk(1, 3, 70, 2, 3, 0); in[1] = mk(1, 3, 70, 2, 3, 0); in[2] = mk(1, 3, 70, 2, 5, 0);
    gradcheck("attention [70,2,3|5]", f_attention, in, 3, &scale); free_all(in, 3);
}
static void test_embedding(void) {
    static const int32_t ids1[10] = {3, 0, 10, 3, 7, 1, 1, 9, 2, 3}, ids2[9] = {6, 0, 0, 2, 6, 6, 1, 5, 3};
    moe_tensor *in[2];
    in[0] = mk(1, 2, 11, 6, 0, 0); in[1] = mk_ids(2, 2, 5, ids1);
    gradcheck("embedding [11,6] ids [2,5]", f_embedding, in, 2, NULL); free_all(in, 2);
    in[0] = mk(1, 2, 7, 3, 0, 0); in[1] = mk_ids(1, 9, 0, ids2);
    gradcheck("embedding [7,3] ids [9]", f_embedding, in, 2, NULL); free_all(in, 2);
}
static void test_cross_entropy(void) {
    static const int32_t t1[6] = {3, 9, -100, 0, 3, 5}, t2[6] = {16, 0, 4, 4, 11, 2};
    moe_tensor *in[2];
    in[0] = mk(1, 2, 6, 10, 0, 0); in[1] = mk_ids(1, 6, 0, t1);
    gradcheck("cross_entropy [6,10] 1 ignored", f_xent, in, 2, NULL); free_all(in, 2);
    in[0] = mk(1, 3, 2, 3, 17, 0); in[1] = mk_ids(2, 2, 3, t2);
    gradcheck("cross_entropy [2,3,17]", f_xent, in, 2, NULL); free_all(in, 2);
}
static void test_topk(void) {
    moe_tensor *in[1];
    int64_t k = 3;
    in[0] = mk(1, 2, 4, 9, 0, 0);
    gradcheck("topk k=3 [4,9]", f_topk, in, 1, &k); free_all(in, 1);
    k = 5;
    in[0] = mk(1, 3, 2, 2, 17, 0);
    gradcheck("topk k=5 [2,2,17]", f_topk, in, 1, &k); free_all(in, 1);
}
static void test_gather_scatter(void) {
    static const int32_t i1[9] = {6, 0, 0, 2, 6, 6, 1, 5, 3}, i2[2] = {2, 0}, i3[3] = {6, 0, 6};
    moe_tensor *in[2];
    int64_t rows;
    in[0] = mk(1, 2, 7, 5, 0, 0); in[1] = mk_ids(1, 9, 0, i1);
    gradcheck("gather [7,5] idx [9]", f_gather, in, 2, NULL); free_all(in, 2);
    in[0] = mk(1, 2, 3, 17, 0, 0); in[1] = mk_ids(1, 2, 0, i2);
    gradcheck("gather [3,17] idx [2]", f_gather, in, 2, NULL); free_all(in, 2);
    rows = 7;
    in[0] = mk(1, 2, 9, 4, 0, 0); in[1] = mk_ids(1, 9, 0, i1);
    gradcheck("scatter_add [9,4] -> [7,4]", f_scatter, in, 2, &rows); free_all(in, 2);
    in[0] = mk(1, 2, 3, 17, 0, 0); in[1] = mk_ids(1, 3, 0, i3);
    gradcheck("scatter_add [3,17] -> [7,17]", f_scatter, in, 2, &rows); free_all(in, 2);
}
static void test_concat_split(void) {
    moe_tensor *in[2];
    int dim = 1;
    int64_t sp[2];
    in[0] = mk(1, 2, 3, 4, 0, 0); in[1] = mk(1, 2, 3, 5, 0, 0);
    gradcheck("concat dim 1 [3,4]|[3,5]", f_concat, in, 2, &dim); free_all(in, 2);
    dim = 0;
    in[0] = mk(1, 3, 2, 3, 4, 0); in[1] = mk(1, 3, 1, 3, 4, 0);
    gradcheck("concat dim 0 [2,3,4]|[1,3,4]", f_concat, in, 2, &dim); free_all(in, 2);
    sp[0] = 1; sp[1] = 4;
    in[0] = mk(1, 2, 3, 9, 0, 0);
    gradcheck("split dim 1 [3,9] at 4", f_split, in, 1, sp); free_all(in, 1);
    sp[0] = 0; sp[1] = 2;
    in[0] = mk(1, 3, 5, 2, 3, 0);
    gradcheck("split dim 0 [5,2,3] at 2", f_split, in, 1, sp); free_all(in, 1);
}
static void test_view(void) {
    moe_tensor *in[2];
    in[0] = mk(1, 2, 4, 5, 0, 0); in[1] = mk(1, 1, 17, 0, 0, 0);
    gradcheck("view of op output and param", f_view, in, 2, NULL); free_all(in, 2);
}


/* ---- model layers (reference §2–§4), on a micro config ---- */

/* 2 layers (dense, MoE), MTP depth 1, q and kv compression, 8 experts in 4 groups of which 2
   are kept, top-2, shared expert: every structural feature at a size FD can sweep. */
static moe_config micro_config(void) {
    moe_config c = moe_config_tiny();
    c.vocab_size = 11; c.hidden_size = 8; c.intermediate_size = 7; c.moe_intermediate_size = 5;
    c.num_hidden_layers = 2; c.first_k_dense_replace = 1; c.num_attention_heads = 2;
    c.q_lora_rank = 6; c.kv_lora_rank = 4; c.qk_nope_head_dim = 4; c.qk_rope_head_dim = 2; c.v_head_dim = 3;
    c.n_routed_experts = 8; c.n_shared_experts = 1; c.num_experts_per_tok = 2; c.n_group = 4; c.topk_group = 2;
    c.max_position_embeddings = 16; c.initializer_range = 0.5;
    return c;
}

typedef struct layer_aux { moe_model *m; moe_tensor *x; int64_t B, T; float alpha; } layer_aux;

/* The layer functions read their input from aux->x, so `in` can list any tensors to check. */
static moe_status f_mla(moe_ctx *c, moe_tensor **in, moe_tensor **y, const void *a) {
    const layer_aux *la = (const layer_aux *)a;
    moe__mla_dims d = moe__model_mla_dims(la->m, la->B, la->T, 0);
    (void)in;
    return moe__mla_forward(c, &la->m->layers[0].attn, &d, &la->m->rope, NULL, la->x, y);
}
/* MoE output plus its balance loss, so both gradients are checked together. */
static moe_status f_moe(moe_ctx *c, moe_tensor **in, moe_tensor **y, const void *a) {
    const layer_aux *la = (const layer_aux *)a;
    moe_tensor *out, *aux, *l;
    moe_status s = moe__moe_forward(c, &la->m->layers[1].moe, &la->m->cfg, la->B, la->T, la->alpha, la->x, &out, &aux);
    (void)in;
    if (s) return s;
    if ((s = weighted_sum(c, out, &l))) return s;
    return moe_add(c, l, aux, y);
}
static moe_status f_model(moe_ctx *c, moe_tensor **in, moe_tensor **y, const void *a) {
    const layer_aux *la = (const layer_aux *)a;
    static const int32_t toks[2 * 6] = {1, 5, 9, 2, 2, 7, 10, 0, 3, 8, 4, 6};
    moe_loss_opts o;
    (void)in;
    o.mtp_lambda = 0.3f;
    o.balance_alpha = la->alpha;
    return moe_model_loss(c, la->m, toks, 2, 5, &o, y, NULL);
}

/* The smallest gap, over tokens, between the key (score + bias) of the last chosen expert
   and the best unchosen one in a kept group. Far above the FD step (1e-6), it means every
   perturbed forward routes exactly like the unperturbed one. */
static double routing_margin(const moe_model *m, const moe_real *u, int64_t N) {
    const moe_config *c = &m->cfg;
    const moe__moe *L = &m->layers[1].moe;
    int64_t E = c->n_routed_experts, per = E / c->n_group, t, e, j, d = c->hidden_size;
    double worst = INFINITY;
    for (t = 0; t < N; t++) {
        moe_real s[64];
        int32_t ch[8];
        double kth = INFINITY, best_out = -INFINITY;
        for (e = 0; e < E; e++) {
            double z = 0;
            for (j = 0; j < d; j++) z += (double)u[t * d + j] * MOE__F32(L->gate)[e * d + j];
            s[e] = (moe_real)(1 / (1 + exp(-z)));
        }
        moe__route(s, MOE__F32(L->bias), c, ch);
        for (j = 0; j < c->num_experts_per_tok; j++) {
            double key = s[ch[j]] + MOE__F32(L->bias)[ch[j]];
            kth = key < kth ? key : kth;
        }
        for (e = 0; e < E; e++) {
            int chosen = 0, group_kept = 0;
            for (j = 0; j < c->num_experts_per_tok; j++) {
                chosen |= ch[j] == e;
                group_kept |= ch[j] / per == e / per;
            }
            if (!chosen && group_kept && s[e] + MOE__F32(L->bias)[e] > best_out) best_out = s[e] + MOE__F32(L->bias)[e];
        }
        if (kth - best_out < worst) worst = kth - best_out;
    }
    return worst;
}

static moe_model *micro_model(moe_config c, uint64_t seed) {
    moe_model *m = NULL;
    if (moe_model_new(g_ctx, &c, seed, &m) != MOE_OK) return NULL;
    return m;
}

static void test_mla_layer(void) {
    moe_config c = micro_config();
    moe_model *m = micro_model(c, 3);
    moe_tensor *in[8];
    moe__mla *w;
    layer_aux a;
    T_ASSERT(m, "model: %s", moe_ctx_error(g_ctx));
    w = &m->layers[0].attn;
    a.m = m; a.B = 2; a.T = 5; a.alpha = 0; a.x = mk(1, 3, 2, 5, 8, 0);
    in[0] = a.x; in[1] = w->q_a; in[2] = w->q_a_norm; in[3] = w->q_b; in[4] = w->kv_a; in[5] = w->kv_a_norm; in[6] = w->kv_b; in[7] = w->o;
    gradcheck("MLA: x, q_a, q_norm, q_b, kv_a, kv_norm, kv_b, o", f_mla, in, 8, &a);
    moe_tensor_free(g_ctx, a.x);
    moe_model_free(g_ctx, m);
    c.q_lora_rank = 0; /* the plain q_proj path */
    m = micro_model(c, 4);
    T_ASSERT(m, "model: %s", moe_ctx_error(g_ctx));
    w = &m->layers[0].attn;
    a.m = m; a.x = mk(1, 3, 2, 5, 8, 0);
    in[0] = a.x; in[1] = w->q_proj;
    gradcheck("MLA with q_proj: x, q_proj", f_mla, in, 2, &a);
    moe_tensor_free(g_ctx, a.x);
    moe_model_free(g_ctx, m);
    /* rope_interleave false (rotate_half over a 4-wide RoPE part: differs from pairs) and YaRN
       with unequal mscale fields (cos/sin scaled): the backward must undo the same rotation */
    c = micro_config();
    c.qk_rope_head_dim = 4;
    c.rope_layout = MOE_ROPE_HALVES;
    c.rope_scaling.factor = 4; c.rope_scaling.original_max_pos = 4; c.rope_scaling.beta_fast = 32; c.rope_scaling.beta_slow = 1;
    c.rope_scaling.mscale = 1; c.rope_scaling.mscale_all_dim = 0.5;
    m = micro_model(c, 6);
    T_ASSERT(m, "model: %s", moe_ctx_error(g_ctx));
    w = &m->layers[0].attn;
    a.m = m; a.x = mk(1, 3, 2, 5, 8, 0);
    in[0] = a.x; in[1] = w->q_b; in[2] = w->kv_a;
    gradcheck("MLA, halves + YaRN: x, q_b, kv_a", f_mla, in, 3, &a);
    moe_tensor_free(g_ctx, a.x);
    moe_model_free(g_ctx, m);
}

static void moe_layer_case(const char *label, moe_config c, float alpha) {
    moe_model *m = micro_model(c, 5);
    moe_tensor *in[6];
    moe__moe *L;
    layer_aux a;
    double margin;
    T_ASSERT(m, "model: %s", moe_ctx_error(g_ctx));
    L = &m->layers[1].moe;
    a.m = m; a.B = 2; a.T = 5; a.alpha = alpha; a.x = mk(1, 3, 2, 5, 8, 0);
    if (c.scoring_func == MOE_SCORING_SIGMOID) {
        margin = routing_margin(m, (const moe_real *)a.x->data, 10);
        T_CHECK(margin > 1e-4, "%s: routing within %.2g of a tie; pick another seed", label, margin);
        T_NOTE("%s: routing margin %.3g (FD step 1e-6)", label, margin);
    }
    in[0] = a.x; in[1] = L->gate; in[2] = L->w13; in[3] = L->w2; in[4] = L->shared.w13; in[5] = L->shared.w2;
    gradcheck(label, f_moe, in, 6, &a);
    moe_tensor_free(g_ctx, a.x);
    moe_model_free(g_ctx, m);
}

static void test_moe_layer(void) {
    moe_config c = micro_config();
    moe_layer_case("MoE sigmoid noaux_tc: x, router, experts, shared", c, 0.0f);
    moe_layer_case("MoE + balance loss a=0.05", c, 0.05f);
    c.norm_topk_prob = 0;
    moe_layer_case("MoE, gates not normalised", c, 0.0f);
    c.scoring_func = MOE_SCORING_SOFTMAX; c.topk_method = MOE_TOPK_GROUP_LIMITED_GREEDY; c.routed_scaling_factor = 1.5;
    moe_layer_case("MoE softmax group_limited_greedy + balance", c, 0.05f);
}

static void test_whole_model(void) {
    moe_config c = micro_config();
    moe_model *m = micro_model(c, 11);
    moe_tensor *in[64];
    layer_aux a;
    int64_t i, n = 0;
    T_ASSERT(m, "model: %s", moe_ctx_error(g_ctx));
    for (i = 0; i < moe_model_tensor_count(m) && n < 64; i++) {
        int is_param;
        moe_tensor *t = moe_model_tensor(m, i, NULL, &is_param);
        if (is_param) in[n++] = t;
    }
    a.m = m; a.alpha = 0.01f; a.x = NULL;
    gradcheck("whole model + MTP + balance: every parameter", f_model, in, (int)n, &a);
    moe_model_free(g_ctx, m);
}

int main(int argc, char **argv) {
    t_filter = argc > 1 ? argv[1] : NULL;
    if (moe_ctx_new(&g_ctx) != MOE_OK) return 1;
    T_RUN_FILTERED(test_matmul);
    T_RUN_FILTERED(test_elementwise);
    T_RUN_FILTERED(test_rmsnorm);
    T_RUN_FILTERED(test_softmax);
    T_RUN_FILTERED(test_rope);
    T_RUN_FILTERED(test_attention);
    T_RUN_FILTERED(test_embedding);
    T_RUN_FILTERED(test_cross_entropy);
    T_RUN_FILTERED(test_topk);
    T_RUN_FILTERED(test_gather_scatter);
    T_RUN_FILTERED(test_concat_split);
    T_RUN_FILTERED(test_view);
    T_RUN_FILTERED(test_mla_layer);
    T_RUN_FILTERED(test_moe_layer);
    T_RUN_FILTERED(test_whole_model);
    moe_ctx_free(g_ctx);
    return t_summary();
}
