/* tests/test_distill.c — knowledge distillation (section 8b): the loss, its gradients, the
   top-k teacher cache and the model-level losses.

   BUILD WITH -DMOE_REAL_F64 (like test_gradcheck): the finite-difference checks need double
   precision. Gradients are compared with central differences, h = 1e-6, tolerance
   1e-6·max(1, max |numeric|), as in test_gradcheck.c (its header comment gives the error
   budget). The loss values themselves are checked against a direct double-precision
   evaluation of the formulas written out here, independently of the library's kernels. */
/* Low split thresholds, so that test_threads' 131 rows of 57 logits (7467 work units) run on
   3 threads, not on the calling one (moe.h's defaults are tuned to the cost of waking one). */
#define MOE__PAR_WORK 4096.0
#define MOE__GEMM_MT_FLOPS 3.0e6
#define MOE_IMPLEMENTATION
#include "moe.h"
#include "test.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifndef MOE_REAL_F64
#error "test_distill must be built with -DMOE_REAL_F64"
#endif

static moe_ctx *g_ctx;
static uint64_t g_stream = 1;
static char g_dir[256];

/* A heap tensor of N(0, std²) values, optionally requiring grads. */
static moe_tensor *mk(int grad, int64_t rows, int64_t v, float std) {
    int64_t shape[2];
    moe_tensor *t = NULL;
    moe_rng rng = moe_rng_new(777, g_stream++);
    shape[0] = rows;
    shape[1] = v;
    if (moe_tensor_new(g_ctx, MOE_F32, 2, shape, &t) != MOE_OK) return NULL;
    moe_tensor_fill_normal(g_ctx, t, &rng, 0.0f, std);
    if (grad) moe_tensor_set_requires_grad(g_ctx, t, 1);
    return t;
}
static moe_tensor *mk_labels(int64_t rows, int64_t v, int ignore_row) {
    moe_tensor *t = NULL;
    int64_t i;
    if (moe_tensor_new(g_ctx, MOE_I32, 1, &rows, &t) != MOE_OK) return NULL;
    for (i = 0; i < rows; i++) ((int32_t *)t->data)[i] = (int32_t)((i * 7 + 3) % v);
    if (ignore_row >= 0) ((int32_t *)t->data)[ignore_row] = -1;
    return t;
}

/* The teacher's top-k of logits z [rows, V] at temperature T, computed directly: ids and
   log-probs most likely first (ties: lower id), tail = Σ of the rest. Heap tensors. */
static void ref_topk(const moe_tensor *z, int64_t k, double T, moe_tensor **ids, moe_tensor **lp, moe_tensor **tail) {
    int64_t rows = z->shape[0], V = z->shape[1], r, i, j, shape[2];
    shape[0] = rows;
    shape[1] = k;
    moe_tensor_new(g_ctx, MOE_I32, 2, shape, ids);
    moe_tensor_new(g_ctx, MOE_F32, 2, shape, lp);
    moe_tensor_new(g_ctx, MOE_F32, 1, shape, tail);
    for (r = 0; r < rows; r++) {
        const double *x = (const double *)z->data + r * V;
        double m = -INFINITY, s = 0, lse, t = 0;
        char used[4096];
        memset(used, 0, sizeof used);
        for (j = 0; j < V; j++) m = x[j] > m ? x[j] : m;
        for (j = 0; j < V; j++) s += exp((x[j] - m) / T);
        lse = m / T + log(s);
        for (i = 0; i < k; i++) {
            int64_t best = -1;
            for (j = 0; j < V; j++)
                if (!used[j] && (best < 0 || x[j] > x[best])) best = j;
            used[best] = 1;
            ((int32_t *)(*ids)->data)[r * k + i] = (int32_t)best;
            ((double *)(*lp)->data)[r * k + i] = x[best] / T - lse;
        }
        for (j = 0; j < V; j++)
            if (!used[j]) t += exp(x[j] / T - lse);
        ((double *)(*tail)->data)[r] = t;
    }
}

/* The loss written out directly (double): mean over counted rows of
   α·CE + (1−α)·T²·KL, KL over the full vocabulary (tk == NULL) or over top-k buckets. */
static double ref_loss(const moe_tensor *zs, const moe_tensor *zt, const moe_tensor *ids, const moe_tensor *lpt,
                       const moe_tensor *tail, const moe_tensor *labels, const moe_distill_opts *o) {
    int64_t rows = zs->shape[0], V = zs->shape[1], r, j, i, n = 0;
    double T = o->temperature, total = 0;
    for (r = 0; r < rows; r++) {
        const double *x = (const double *)zs->data + r * V;
        double m = -INFINITY, s1 = 0, sT = 0, lse1, lseT, kl = 0, ce = 0;
        int lab = labels ? ((int32_t *)labels->data)[r] : -2;
        if (lab == o->ignore_index) continue;
        for (j = 0; j < V; j++) m = x[j] > m ? x[j] : m;
        for (j = 0; j < V; j++) { s1 += exp(x[j] - m); sT += exp((x[j] - m) / T); }
        lse1 = m + log(s1);
        lseT = m / T + log(sT);
        if (labels) ce = lse1 - x[lab];
        if (zt) {
            const double *y = (const double *)zt->data + r * V;
            double my = -INFINITY, sy = 0, lsey;
            for (j = 0; j < V; j++) my = y[j] > my ? y[j] : my;
            for (j = 0; j < V; j++) sy += exp((y[j] - my) / T);
            lsey = my / T + log(sy);
            for (j = 0; j < V; j++) {
                double lp = y[j] / T - lsey, lq = x[j] / T - lseT;
                kl += o->direction == MOE_KL_FORWARD ? exp(lp) * (lp - lq) : exp(lq) * (lq - lp);
            }
        } else {
            int64_t k = ids->shape[1];
            double qS = 0, pR = ((double *)tail->data)[r], qR;
            for (i = 0; i < k; i++) {
                double lp = ((double *)lpt->data)[r * k + i], lq = x[((int32_t *)ids->data)[r * k + i]] / T - lseT;
                qS += exp(lq);
                kl += o->direction == MOE_KL_FORWARD ? exp(lp) * (lp - lq) : exp(lq) * (lq - lp);
            }
            qR = 1 - qS; /* fine for the test's well-spread tails */
            if (k < V) {
                if (o->direction == MOE_KL_FORWARD) { if (pR > 0) kl += pR * (log(pR) - log(qR)); }
                else kl += qR * (log(qR) - log(pR > 1e-30 ? pR : 1e-30));
            }
        }
        total += o->alpha * ce + (1 - o->alpha) * T * T * kl;
        n++;
    }
    return n ? total / (double)n : 0;
}

typedef struct teacher {
    moe_tensor *zt, *ids, *lp, *tail; /* zt for online, the others for top-k */
} teacher;

static moe_status loss_of(moe_tensor *zs, const teacher *t, moe_tensor *labels, const moe_distill_opts *o, moe_tensor **loss) {
    moe_tensor *l;
    moe_status s = t->zt ? moe_distill_loss(g_ctx, zs, t->zt, labels, o, &l, NULL)
                         : moe_distill_loss_topk(g_ctx, zs, t->ids, t->lp, t->tail, labels, o, &l, NULL);
    if (s) return s;
    return moe_scale(g_ctx, l, 1.7f, loss); /* an upstream gradient other than 1 */
}

/* Analytic vs central-difference gradient of the loss w.r.t. the student logits; also the
   loss value vs ref_loss. */
static void check_grad(const char *label, moe_tensor *zs, const teacher *t, moe_tensor *labels, const moe_distill_opts *o) {
    const double h = 1e-6, tol = 1e-6;
    moe_tensor *loss;
    double max_err = 0, max_num = 0, ref, got;
    int64_t i;
    moe_status s;
    moe_tensor_zero_grad(zs);
    moe_ctx_reset(g_ctx);
    s = loss_of(zs, t, labels, o, &loss);
    T_ASSERT(s == MOE_OK, "%s: forward failed: %s", label, moe_ctx_error(g_ctx));
    got = moe_tensor_get(loss, 0) / (double)1.7f;
    ref = ref_loss(zs, t->zt, t->ids, t->lp, t->tail, labels, o);
    T_CHECK(fabs(got - ref) <= 1e-10 * (fabs(ref) > 1 ? fabs(ref) : 1), "%s: loss %.15g, direct formula %.15g", label, got, ref);
    s = moe_backward(g_ctx, loss);
    T_ASSERT(s == MOE_OK, "%s: backward failed: %s", label, moe_ctx_error(g_ctx));
    moe_ctx_reset(g_ctx);
    moe_ctx_set_grad_enabled(g_ctx, 0);
    for (i = 0; i < zs->numel; i++) {
        double *x = (double *)zs->data, saved = x[i], lp, lm, num, ana;
        x[i] = saved + h;
        s = loss_of(zs, t, labels, o, &loss);
        lp = s ? NAN : moe_tensor_get(loss, 0);
        moe_ctx_reset(g_ctx);
        x[i] = saved - h;
        s = loss_of(zs, t, labels, o, &loss);
        lm = s ? NAN : moe_tensor_get(loss, 0);
        moe_ctx_reset(g_ctx);
        x[i] = saved;
        num = (lp - lm) / (2 * h);
        ana = ((double *)zs->grad->data)[i];
        if (!(fabs(ana - num) <= max_err)) max_err = fabs(ana - num);
        if (fabs(num) > max_num) max_num = fabs(num);
    }
    moe_ctx_set_grad_enabled(g_ctx, 1);
    T_CHECK(max_err <= tol * (max_num > 1 ? max_num : 1), "%s: max |analytic - numeric| = %.3g (max |grad| %.3g)", label, max_err,
            max_num);
    T_NOTE("%-40s loss %.6f, max err %.2e (max |grad| %.2g)", label, got, max_err, max_num);
}

static void test_gradcheck_online(void) {
    static const float temps[] = {0.5f, 1.0f, 2.0f, 4.0f};
    static const float alphas[] = {0.0f, 0.3f};
    moe_tensor *zs = mk(1, 6, 37, 1.5f), *labels = mk_labels(6, 37, 2);
    teacher t;
    int d, ti, ai;
    memset(&t, 0, sizeof t);
    t.zt = mk(0, 6, 37, 2.0f);
    for (d = 0; d < 2; d++)
        for (ti = 0; ti < 4; ti++)
            for (ai = 0; ai < 2; ai++) {
                moe_distill_opts o = moe_distill_defaults();
                char label[96];
                o.direction = d ? MOE_KL_REVERSE : MOE_KL_FORWARD;
                o.temperature = temps[ti];
                o.alpha = alphas[ai];
                snprintf(label, sizeof label, "online %s T=%g alpha=%g", d ? "reverse" : "forward", (double)temps[ti],
                         (double)alphas[ai]);
                check_grad(label, zs, &t, labels, &o);
            }
    {   /* no labels, alpha 0: every row counts */
        moe_distill_opts o = moe_distill_defaults();
        o.alpha = 0;
        check_grad("online forward T=2 no labels", zs, &t, NULL, &o);
    }
    moe_tensor_free(g_ctx, zs);
    moe_tensor_free(g_ctx, t.zt);
    moe_tensor_free(g_ctx, labels);
}

static void test_gradcheck_topk(void) {
    static const float temps[] = {0.5f, 1.0f, 2.0f, 4.0f};
    moe_tensor *zs = mk(1, 5, 29, 1.5f), *zt = mk(0, 5, 29, 2.0f), *labels = mk_labels(5, 29, 1);
    int d, ti;
    for (d = 0; d < 2; d++)
        for (ti = 0; ti < 4; ti++) {
            moe_distill_opts o = moe_distill_defaults();
            teacher t;
            char label[96];
            memset(&t, 0, sizeof t);
            o.direction = d ? MOE_KL_REVERSE : MOE_KL_FORWARD;
            o.temperature = temps[ti];
            o.alpha = 0.25f;
            ref_topk(zt, 6, temps[ti], &t.ids, &t.lp, &t.tail);
            snprintf(label, sizeof label, "top-6 of 29 %s T=%g", d ? "reverse" : "forward", (double)temps[ti]);
            check_grad(label, zs, &t, labels, &o);
            moe_tensor_free(g_ctx, t.ids); moe_tensor_free(g_ctx, t.lp); moe_tensor_free(g_ctx, t.tail);
        }
    moe_tensor_free(g_ctx, zs);
    moe_tensor_free(g_ctx, zt);
    moe_tensor_free(g_ctx, labels);
}

/* k = V (no tail) gives the online loss and gradient; k < V gives at most the full KL
   (merging outcomes into buckets never increases a KL divergence). */
static void test_topk_matches_full(void) {
    moe_tensor *zs = mk(1, 4, 23, 1.0f), *zt = mk(0, 4, 23, 2.0f), *labels = mk_labels(4, 23, -1), *l1, *l2;
    moe_tensor *ids, *lp, *tail;
    moe_distill_parts p1, p2;
    int d;
    for (d = 0; d < 2; d++) {
        moe_distill_opts o = moe_distill_defaults();
        double g1[4 * 23], maxd = 0;
        int64_t i, k;
        o.direction = d ? MOE_KL_REVERSE : MOE_KL_FORWARD;
        o.temperature = 1.5f;
        moe_tensor_zero_grad(zs);
        moe_ctx_reset(g_ctx);
        T_ASSERT(moe_distill_loss(g_ctx, zs, zt, labels, &o, &l1, &p1) == MOE_OK, "%s", moe_ctx_error(g_ctx));
        T_ASSERT(moe_backward(g_ctx, l1) == MOE_OK, "%s", moe_ctx_error(g_ctx));
        memcpy(g1, zs->grad->data, sizeof g1);
        moe_tensor_zero_grad(zs);
        moe_ctx_reset(g_ctx);
        ref_topk(zt, 23, 1.5, &ids, &lp, &tail);
        T_ASSERT(moe_distill_loss_topk(g_ctx, zs, ids, lp, tail, labels, &o, &l2, &p2) == MOE_OK, "%s", moe_ctx_error(g_ctx));
        T_ASSERT(moe_backward(g_ctx, l2) == MOE_OK, "%s", moe_ctx_error(g_ctx));
        for (i = 0; i < zs->numel; i++) maxd = fmax(maxd, fabs(g1[i] - ((double *)zs->grad->data)[i]));
        T_CHECK(fabs(p1.total - p2.total) < 1e-12 && maxd < 1e-12, "%s k = V: loss %.15g vs %.15g, max grad diff %.3g",
                d ? "reverse" : "forward", p1.total, p2.total, maxd);
        moe_tensor_free(g_ctx, ids); moe_tensor_free(g_ctx, lp); moe_tensor_free(g_ctx, tail);
        for (k = 1; k < 23; k += 5) {
            moe_ctx_reset(g_ctx);
            ref_topk(zt, k, 1.5, &ids, &lp, &tail);
            T_ASSERT(moe_distill_loss_topk(g_ctx, zs, ids, lp, tail, labels, &o, &l2, &p2) == MOE_OK, "%s", moe_ctx_error(g_ctx));
            T_CHECK(p2.kl <= p1.kl + 1e-12 && p2.kl >= 0, "%s k = %lld: bucket KL %.6g above the full KL %.6g",
                    d ? "reverse" : "forward", (long long)k, p2.kl, p1.kl);
            moe_tensor_free(g_ctx, ids); moe_tensor_free(g_ctx, lp); moe_tensor_free(g_ctx, tail);
        }
        T_NOTE("%s: full KL %.6f = top-23 KL; CE %.6f", d ? "reverse" : "forward", p1.kl, p1.ce);
    }
    moe_ctx_reset(g_ctx);
    moe_tensor_free(g_ctx, zs); moe_tensor_free(g_ctx, zt); moe_tensor_free(g_ctx, labels);
}

/* Identical teacher and student: KL = 0 and, with alpha 0, a zero gradient. */
static void test_identical_zero(void) {
    moe_tensor *zs = mk(1, 7, 41, 2.0f), *loss;
    moe_distill_parts p;
    int d, ti;
    static const float temps[] = {0.5f, 1.0f, 3.0f};
    for (d = 0; d < 2; d++)
        for (ti = 0; ti < 3; ti++) {
            moe_distill_opts o = moe_distill_defaults();
            double gmax = 0;
            int64_t i;
            o.alpha = 0;
            o.direction = d ? MOE_KL_REVERSE : MOE_KL_FORWARD;
            o.temperature = temps[ti];
            moe_tensor_zero_grad(zs);
            moe_ctx_reset(g_ctx);
            T_ASSERT(moe_distill_loss(g_ctx, zs, zs, NULL, &o, &loss, &p) == MOE_OK, "%s", moe_ctx_error(g_ctx));
            T_ASSERT(moe_backward(g_ctx, loss) == MOE_OK, "%s", moe_ctx_error(g_ctx));
            for (i = 0; i < zs->numel; i++) gmax = fmax(gmax, fabs(((double *)zs->grad->data)[i]));
            T_CHECK(fabs(p.kl) < 1e-14 && fabs(p.total) < 1e-13 && gmax < 1e-15,
                    "%s T=%g: KL %.3g, loss %.3g, max |grad| %.3g", d ? "reverse" : "forward", (double)temps[ti], p.kl, p.total, gmax);
        }
    /* the same through a top-k cache with k < V: the student's tail matches the teacher's too */
    {
        moe_tensor *ids, *lp, *tail;
        moe_distill_opts o = moe_distill_defaults();
        double gmax = 0;
        int64_t i;
        o.alpha = 0;
        ref_topk(zs, 8, 2.0, &ids, &lp, &tail);
        for (d = 0; d < 2; d++) {
            o.direction = d ? MOE_KL_REVERSE : MOE_KL_FORWARD;
            moe_tensor_zero_grad(zs);
            moe_ctx_reset(g_ctx);
            T_ASSERT(moe_distill_loss_topk(g_ctx, zs, ids, lp, tail, NULL, &o, &loss, &p) == MOE_OK, "%s", moe_ctx_error(g_ctx));
            T_ASSERT(moe_backward(g_ctx, loss) == MOE_OK, "%s", moe_ctx_error(g_ctx));
            for (i = 0, gmax = 0; i < zs->numel; i++) gmax = fmax(gmax, fabs(((double *)zs->grad->data)[i]));
            T_CHECK(fabs(p.kl) < 1e-13 && gmax < 1e-13, "top-8 %s: KL %.3g, max |grad| %.3g", d ? "reverse" : "forward", p.kl, gmax);
        }
        moe_tensor_free(g_ctx, ids); moe_tensor_free(g_ctx, lp); moe_tensor_free(g_ctx, tail);
    }
    moe_ctx_reset(g_ctx);
    moe_tensor_free(g_ctx, zs);
}

/* Same loss and gradient bits for 1 and 3 threads (rows are split into chunks per thread). */
static void test_threads(void) {
    moe_tensor *zs = mk(1, 131, 57, 1.0f), *zt = mk(0, 131, 57, 2.0f), *labels = mk_labels(131, 57, 5), *loss, *ids, *lp, *tail;
    double v[2], *g[2];
    int run, same = 1;
    int64_t i;
    moe_distill_opts o = moe_distill_defaults();
    ref_topk(zt, 9, 2.0, &ids, &lp, &tail);
    for (run = 0; run < 2; run++) {
        moe_tensor *l2;
        moe_ctx_set_threads(g_ctx, run ? 3 : 1);
        moe_tensor_zero_grad(zs);
        moe_ctx_reset(g_ctx);
        T_ASSERT(moe_distill_loss(g_ctx, zs, zt, labels, &o, &loss, NULL) == MOE_OK, "%s", moe_ctx_error(g_ctx));
        T_ASSERT(moe_distill_loss_topk(g_ctx, zs, ids, lp, tail, labels, &o, &l2, NULL) == MOE_OK, "%s", moe_ctx_error(g_ctx));
        T_ASSERT(moe_add(g_ctx, loss, l2, &loss) == MOE_OK, "%s", moe_ctx_error(g_ctx));
        T_ASSERT(moe_backward(g_ctx, loss) == MOE_OK, "%s", moe_ctx_error(g_ctx));
        v[run] = moe_tensor_get(loss, 0);
        g[run] = (double *)malloc(sizeof(double) * (size_t)zs->numel);
        memcpy(g[run], zs->grad->data, sizeof(double) * (size_t)zs->numel);
    }
    for (i = 0; i < zs->numel; i++) same &= g[0][i] == g[1][i];
    T_CHECK(v[0] == v[1] && same, "1 vs 3 threads: loss %.17g vs %.17g, gradients %s", v[0], v[1], same ? "equal" : "differ");
    free(g[0]); free(g[1]);
    moe_ctx_set_threads(g_ctx, 2);
    moe_ctx_reset(g_ctx);
    moe_tensor_free(g_ctx, zs); moe_tensor_free(g_ctx, zt); moe_tensor_free(g_ctx, labels);
    moe_tensor_free(g_ctx, ids); moe_tensor_free(g_ctx, lp); moe_tensor_free(g_ctx, tail);
}

/* ---- the cache file ---- */

/* Files under $TMPDIR (or /tmp), named with the pid so that parallel runs do not collide. */
static void path_of(char *buf, size_t n, const char *name) { snprintf(buf, n, "%s/moe_distill_%ld_%s", g_dir, (long)getpid(), name); }

/* Write zt [rows, V] as a cache in two appends; returns MOE_OK or the error. */
static moe_status write_cache(const char *path, moe_tensor *zt, int64_t k, float T, uint64_t tag) {
    moe_distill_writer *w;
    moe_tensor *a, *b;
    int64_t rows = zt->shape[0], V = zt->shape[1], s0[2], s1[2];
    moe_status s;
    s0[0] = rows / 3; s0[1] = V;
    s1[0] = rows - rows / 3; s1[1] = V;
    if ((s = moe_distill_writer_new(g_ctx, path, V, k, T, tag, &w))) return s;
    s = moe_tensor_view(g_ctx, zt, 2, s0, 0, &a);
    if (!s) s = moe_tensor_view(g_ctx, zt, 2, s1, s0[0] * V, &b);
    if (!s) s = moe_distill_writer_add(g_ctx, w, a);
    if (!s) s = moe_distill_writer_add(g_ctx, w, b);
    if (!s) s = moe_distill_writer_finish(g_ctx, w);
    moe_distill_writer_free(w);
    moe_ctx_reset(g_ctx);
    return s;
}

static void test_cache_roundtrip(void) {
    char path[512];
    moe_tensor *zt = mk(0, 50, 31, 2.5f), *zs = mk(1, 50, 31, 1.0f), *labels = mk_labels(50, 31, 4);
    moe_tensor *ids, *lp, *tail, *cids, *clp, *ctail, *l1, *l2;
    moe_distill_cache *c = NULL;
    moe_distill_info info;
    moe_distill_parts p1, p2;
    moe_distill_opts o = moe_distill_defaults();
    double max_lp = 0, max_tail = 0, max_mass = 0;
    int64_t i, r, bad_ids = 0;
    path_of(path, sizeof path, "rt.cache");
    T_ASSERT(write_cache(path, zt, 7, 2.0f, 0xABCDEFull) == MOE_OK, "write: %s", moe_ctx_error(g_ctx));
    T_ASSERT(moe_distill_cache_open(g_ctx, path, &c) == MOE_OK, "open: %s", moe_ctx_error(g_ctx));
    info = moe_distill_cache_info(c);
    T_CHECK(info.vocab == 31 && info.k == 7 && info.count == 50 && info.temperature == 2.0f && info.tag == 0xABCDEFull,
            "info: vocab %lld k %lld count %lld T %g tag %llx", (long long)info.vocab, (long long)info.k, (long long)info.count,
            (double)info.temperature, (unsigned long long)info.tag);
    ref_topk(zt, 7, 2.0, &ids, &lp, &tail);
    /* read in three pieces at explicit positions (as a training loop streams them) */
    for (r = 0; r < 50; r += 20) {
        int64_t n = r + 20 <= 50 ? 20 : 50 - r;
        moe_ctx_reset(g_ctx);
        T_ASSERT(moe_distill_cache_read(g_ctx, c, r, n, &cids, &clp, &ctail) == MOE_OK, "read: %s", moe_ctx_error(g_ctx));
        for (i = 0; i < n * 7; i++) {
            bad_ids += ((int32_t *)cids->data)[i] != ((int32_t *)ids->data)[r * 7 + i];
            max_lp = fmax(max_lp, fabs(((double *)clp->data)[i] - ((double *)lp->data)[r * 7 + i]));
        }
        for (i = 0; i < n; i++) {
            double t = ((double *)tail->data)[r + i], m = ((double *)ctail->data)[i];
            int64_t j;
            max_tail = fmax(max_tail, fabs(m - t) / t); /* relative: the tail is summed, not 1 − Σ top-k */
            for (j = 0; j < 7; j++) m += exp(((double *)clp->data)[i * 7 + j]);
            max_mass = fmax(max_mass, fabs(m - 1));
        }
    }
    T_CHECK(bad_ids == 0, "%lld ids differ from the direct top-k", (long long)bad_ids);
    T_CHECK(max_lp < 1e-6 && max_tail < 1e-6 && max_mass < 1e-6, "log-prob err %.3g, tail rel err %.3g, mass err %.3g", max_lp,
            max_tail, max_mass);
    T_NOTE("50 records of k=7: max |logp err| %.2g, tail rel err %.2g, |top-k + tail - 1| %.2g", max_lp, max_tail, max_mass);
    /* the tail-mass term: the loss from the cache equals the loss from the exact top-k */
    moe_ctx_reset(g_ctx);
    T_ASSERT(moe_distill_cache_read(g_ctx, c, 0, 50, &cids, &clp, &ctail) == MOE_OK, "read: %s", moe_ctx_error(g_ctx));
    T_ASSERT(moe_distill_loss_topk(g_ctx, zs, cids, clp, ctail, labels, &o, &l1, &p1) == MOE_OK, "%s", moe_ctx_error(g_ctx));
    T_ASSERT(moe_distill_loss_topk(g_ctx, zs, ids, lp, tail, labels, &o, &l2, &p2) == MOE_OK, "%s", moe_ctx_error(g_ctx));
    T_CHECK(fabs(p1.kl - p2.kl) < 1e-6 && p1.kl > 0, "KL from the cache %.9g vs exact top-k %.9g", p1.kl, p2.kl);
    {   /* and the tail term is really there: without it the KL differs */
        moe_tensor *z0;
        moe_distill_parts p3;
        T_ASSERT(moe_tensor_temp(g_ctx, MOE_F32, 1, ctail->shape, &z0) == MOE_OK, "%s", moe_ctx_error(g_ctx));
        for (i = 0; i < 50; i++) { /* move the tail mass into the top id: same total, no tail */
            double t = ((double *)ctail->data)[i], *l0 = (double *)clp->data + i * 7;
            *l0 = log(exp(*l0) + t);
        }
        T_ASSERT(moe_distill_loss_topk(g_ctx, zs, cids, clp, z0, labels, &o, &l2, &p3) == MOE_OK, "%s", moe_ctx_error(g_ctx));
        T_CHECK(fabs(p3.kl - p1.kl) > 1e-3, "the tail term changes nothing: %.6g vs %.6g", p3.kl, p1.kl);
        T_NOTE("KL with the tail bucket %.6f; with the tail mass moved to the top id %.6f", p1.kl, p3.kl);
    }
    moe_ctx_reset(g_ctx);
    moe_distill_cache_close(c);
    moe_tensor_free(g_ctx, ids); moe_tensor_free(g_ctx, lp); moe_tensor_free(g_ctx, tail);
    moe_tensor_free(g_ctx, zt); moe_tensor_free(g_ctx, zs); moe_tensor_free(g_ctx, labels);
    remove(path);
}

static unsigned char *slurp(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    unsigned char *b;
    long len;
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    len = ftell(f);
    fseek(f, 0, SEEK_SET);
    b = (unsigned char *)malloc((size_t)len + 1);
    if (fread(b, 1, (size_t)len, f) != (size_t)len) len = 0;
    fclose(f);
    *n = (size_t)len;
    return b;
}
static void spit(const char *path, const unsigned char *b, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) return;
    fwrite(b, 1, n, f);
    fclose(f);
}
static uint64_t fnv(uint64_t h, const unsigned char *p, size_t n) {
    size_t i;
    for (i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001B3ull;
    return h;
}
/* Recompute the checksum after an edit, so that only the check under test can catch it. */
static void reseal(unsigned char *b, size_t n) {
    uint64_t h = fnv(fnv(0xCBF29CE484222325ull, b + 64, n - 64), b, 56);
    int i;
    for (i = 0; i < 8; i++) b[56 + i] = (unsigned char)(h >> (8 * i));
}
static void put32(unsigned char *p, uint32_t v) { int i; for (i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i)); }

static void test_cache_bad_files(void) {
    char good[512], bad[512];
    moe_tensor *zt = mk(0, 6, 11, 2.0f), *ids, *lp, *tail;
    unsigned char *b, *e;
    size_t n = 0;
    int i, refused_open = 0, refused_read = 0;
    moe_distill_cache *c = NULL;
    const size_t rec = 8 * 4 + 4;
    struct { const char *what; int kind; } cases[] = {
        {"empty file", 0}, {"half a header", 1}, {"bad magic", 2}, {"version 2", 3}, {"one byte short", 4},
        {"one byte extra", 5}, {"a record byte flipped", 6}, {"header count + 1", 7}, {"k = 0 (resealed)", 8},
        {"k > vocab (resealed)", 9}, {"temperature NaN (resealed)", 10}, {"reserved != 0 (resealed)", 11},
        {"count 2^61 (resealed)", 12}, {"header tag flipped", 13},
    };
    path_of(good, sizeof good, "good.cache");
    path_of(bad, sizeof bad, "bad.cache");
    T_ASSERT(write_cache(good, zt, 4, 1.0f, 1) == MOE_OK, "write: %s", moe_ctx_error(g_ctx));
    b = slurp(good, &n);
    T_ASSERT(b && n == 64 + 6 * rec, "cache size %zu, want %zu", n, 64 + 6 * rec);
    e = (unsigned char *)malloc(n + 1);
    T_CHECK(moe_distill_cache_open(g_ctx, "/nonexistent/x.cache", &c) == MOE_ERR_IO && !c, "a missing file is not MOE_ERR_IO");
    for (i = 0; i < (int)(sizeof cases / sizeof cases[0]); i++) {
        size_t m = n;
        moe_status s;
        memcpy(e, b, n);
        switch (cases[i].kind) {
        case 0: m = 0; break;
        case 1: m = 32; break;
        case 2: e[0] = 'X'; break;
        case 3: put32(e + 8, 2); break;
        case 4: m = n - 1; break;
        case 5: e[n] = 0; m = n + 1; break;
        case 6: e[64 + rec + 5] ^= 0x10; break;
        case 7: e[24] += 1; break;
        case 8: put32(e + 12, 0); reseal(e, m); break;
        case 9: put32(e + 12, 12); reseal(e, m); break;
        case 10: put32(e + 32, 0x7FC00000u); reseal(e, m); break;
        case 11: e[50] = 1; reseal(e, m); break;
        case 12: e[31] = 0x20; reseal(e, m); break;
        case 13: e[40] ^= 1; break;
        }
        spit(bad, e, m);
        c = NULL;
        s = moe_distill_cache_open(g_ctx, bad, &c);
        T_CHECK(s == MOE_ERR_FORMAT && !c, "%s: opened (status %s)", cases[i].what, moe_status_name(s));
        refused_open += s == MOE_ERR_FORMAT;
        if (c) moe_distill_cache_close(c);
        if (i == 6) T_NOTE("e.g. %s: %s", cases[i].what, moe_ctx_error(g_ctx));
    }
    /* hostile records under a valid checksum: the reader checks what the loss relies on */
    for (i = 0; i < 4; i++) {
        moe_status s;
        memcpy(e, b, n);
        if (i == 0) memcpy(e + 64 + 4, e + 64, 4);                             /* duplicate id */
        if (i == 1) put32(e + 64 + rec, 11);                                   /* id = vocab */
        if (i == 2) put32(e + 64 + 16, 0x3F800000u);                           /* log-prob +1 */
        if (i == 3) put32(e + 64 + 32, 0x3F000000u);                           /* tail 0.5: masses sum above 1 */
        reseal(e, n);
        spit(bad, e, n);
        T_ASSERT(moe_distill_cache_open(g_ctx, bad, &c) == MOE_OK, "hostile %d: %s", i, moe_ctx_error(g_ctx));
        s = moe_distill_cache_read(g_ctx, c, 0, 6, &ids, &lp, &tail);
        T_CHECK(s == MOE_ERR_FORMAT, "hostile record %d read with status %s", i, moe_status_name(s));
        refused_read += s == MOE_ERR_FORMAT;
        if (i == 0) T_NOTE("e.g. %s", moe_ctx_error(g_ctx));
        moe_distill_cache_close(c);
        moe_ctx_reset(g_ctx);
    }
    /* out-of-range reads */
    T_ASSERT(moe_distill_cache_open(g_ctx, good, &c) == MOE_OK, "%s", moe_ctx_error(g_ctx));
    T_CHECK(moe_distill_cache_read(g_ctx, c, 3, 4, &ids, &lp, &tail) == MOE_ERR_ARG, "records 3..6 of 6 were read");
    T_CHECK(moe_distill_cache_read(g_ctx, c, -1, 1, &ids, &lp, &tail) == MOE_ERR_ARG, "record -1 was read");
    T_CHECK(moe_distill_cache_read(g_ctx, c, 0, 0, &ids, &lp, &tail) == MOE_ERR_ARG, "0 records were read");
    T_CHECK(moe_distill_cache_read(g_ctx, NULL, 0, 1, &ids, &lp, &tail) == MOE_ERR_ARG, "NULL cache was read");
    moe_distill_cache_close(c);
    moe_ctx_reset(g_ctx);
    T_NOTE("%d bad files refused at open, %d hostile records refused at read", refused_open, refused_read);
    free(b); free(e);
    remove(good); remove(bad);
    moe_tensor_free(g_ctx, zt);
}

/* Bad arguments to the losses and the writer: errors, never crashes. */
static void test_bad_args(void) {
    moe_tensor *zs = mk(1, 3, 10, 1.0f), *zt = mk(0, 3, 10, 1.0f), *zt9 = mk(0, 3, 9, 1.0f), *labels = mk_labels(3, 10, -1);
    moe_tensor *loss, *ids, *lp, *tail;
    moe_distill_opts o = moe_distill_defaults();
    moe_distill_writer *w;
    char path[512];
    T_CHECK(moe_distill_loss(g_ctx, zs, zt9, labels, &o, &loss, NULL) == MOE_ERR_SHAPE, "vocab 10 vs 9 accepted");
    T_NOTE("vocab mismatch: %s", moe_ctx_error(g_ctx));
    T_CHECK(moe_distill_loss(g_ctx, zs, zt, NULL, &o, &loss, NULL) == MOE_ERR_ARG, "NULL labels with alpha 0.5 accepted");
    T_CHECK(moe_distill_loss(g_ctx, zs, NULL, labels, &o, &loss, NULL) == MOE_ERR_ARG, "NULL teacher accepted");
    T_CHECK(moe_distill_loss(g_ctx, zs, zt, labels, &o, NULL, NULL) == MOE_ERR_ARG, "NULL out accepted");
    o.temperature = 0;
    T_CHECK(moe_distill_loss(g_ctx, zs, zt, labels, &o, &loss, NULL) == MOE_ERR_ARG, "temperature 0 accepted");
    o.temperature = 1;
    o.alpha = 1.5f;
    T_CHECK(moe_distill_loss(g_ctx, zs, zt, labels, &o, &loss, NULL) == MOE_ERR_ARG, "alpha 1.5 accepted");
    o.alpha = 0.5f;
    o.direction = (moe_kl_dir)7;
    T_CHECK(moe_distill_loss(g_ctx, zs, zt, labels, &o, &loss, NULL) == MOE_ERR_ARG, "direction 7 accepted");
    o = moe_distill_defaults();
    ((int32_t *)labels->data)[1] = 10;
    T_CHECK(moe_distill_loss(g_ctx, zs, zt, labels, &o, &loss, NULL) == MOE_ERR_ARG, "label 10 of vocab 10 accepted");
    ((int32_t *)labels->data)[1] = 1;
    ((double *)zt->data)[4] = NAN;
    T_CHECK(moe_distill_loss(g_ctx, zs, zt, labels, &o, &loss, NULL) == MOE_ERR_NUMERIC, "NaN teacher accepted");
    ref_topk(zs, 3, 2.0, &ids, &lp, &tail);
    ((int32_t *)ids->data)[0] = 9;
    T_CHECK(moe_distill_loss_topk(g_ctx, zt9, ids, lp, tail, labels, &o, &loss, NULL) == MOE_ERR_ARG, "id 9 for a 9-wide student accepted");
    ((int32_t *)ids->data)[1] = ((int32_t *)ids->data)[0];
    T_CHECK(moe_distill_loss_topk(g_ctx, zs, ids, lp, tail, labels, &o, &loss, NULL) == MOE_ERR_ARG, "duplicate top-k id accepted");
    path_of(path, sizeof path, "w.cache");
    T_CHECK(moe_distill_writer_new(g_ctx, path, 10, 11, 1.0f, 0, &w) == MOE_ERR_ARG && !w, "k > vocab accepted by the writer");
    T_CHECK(moe_distill_writer_new(g_ctx, path, 10, 2, -1.0f, 0, &w) == MOE_ERR_ARG, "temperature -1 accepted by the writer");
    T_ASSERT(moe_distill_writer_new(g_ctx, path, 10, 2, 1.0f, 0, &w) == MOE_OK, "%s", moe_ctx_error(g_ctx));
    T_CHECK(moe_distill_writer_add(g_ctx, w, zt9) == MOE_ERR_SHAPE, "9-wide logits added to a vocab-10 cache");
    T_CHECK(moe_distill_writer_add(g_ctx, w, zt) == MOE_ERR_NUMERIC, "NaN logits added to the cache");
    moe_distill_writer_free(w); /* unfinished: nothing at path */
    T_CHECK(access(path, F_OK) != 0, "an unfinished writer left '%s'", path);
    moe_ctx_reset(g_ctx);
    moe_tensor_free(g_ctx, zs); moe_tensor_free(g_ctx, zt); moe_tensor_free(g_ctx, zt9); moe_tensor_free(g_ctx, labels);
    moe_tensor_free(g_ctx, ids); moe_tensor_free(g_ctx, lp); moe_tensor_free(g_ctx, tail);
}

/* ---- model level ---- */

static moe_config small_cfg(int64_t hidden, int64_t layers, int64_t vocab) {
    moe_config c = moe_config_tiny();
    c.vocab_size = vocab;
    c.hidden_size = hidden;
    c.num_hidden_layers = layers;
    c.max_position_embeddings = 16;
    return c;
}

static void test_model_online_and_cached(void) {
    moe_config cs = small_cfg(32, 2, 40), ct = small_cfg(48, 3, 40), cv = small_cfg(32, 2, 41);
    moe_model *st = NULL, *te = NULL, *tw = NULL, *sv = NULL;
    moe_tensor *loss, *logits;
    moe_distill_parts p, pc;
    moe_loss_opts lo;
    moe_distill_opts o = moe_distill_defaults();
    int32_t tok[2 * 9];
    int64_t i, nt, nw;
    double tgrad = 0;
    char path[512];
    moe_distill_cache *c;
    moe_distill_writer *w;
    size_t used[2];
    for (i = 0; i < 18; i++) tok[i] = (int32_t)((i * 13 + 5) % 40);
    lo.mtp_lambda = 0.3f;
    lo.balance_alpha = 1e-4f;
    T_ASSERT(moe_model_new(g_ctx, &cs, 1, &st) == MOE_OK && moe_model_new(g_ctx, &ct, 2, &te) == MOE_OK &&
                 moe_model_new(g_ctx, &cs, 1, &tw) == MOE_OK && moe_model_new(g_ctx, &cv, 1, &sv) == MOE_OK,
             "%s", moe_ctx_error(g_ctx));
    nt = moe_model_tensor_count(te);
    /* online: the teacher takes no gradient and its loads do not move */
    moe_model_zero_grad(te);
    for (i = 0; i < 2; i++) {
        moe_ctx_reset(g_ctx);
        T_ASSERT(moe_model_distill_loss(g_ctx, st, te, tok, 2, 8, &lo, &o, &loss, &p) == MOE_OK, "%s", moe_ctx_error(g_ctx));
        used[i] = moe_ctx_arena_used(g_ctx);
        T_ASSERT(moe_backward(g_ctx, loss) == MOE_OK, "%s", moe_ctx_error(g_ctx));
    }
    for (i = 0; i < nt; i++) {
        int is_param;
        moe_tensor *t = moe_model_tensor(te, i, NULL, &is_param);
        int64_t j;
        if (t->grad)
            for (j = 0; j < t->numel; j++) tgrad = fmax(tgrad, fabs(moe_tensor_get(t->grad, j)));
    }
    T_CHECK(tgrad == 0, "the teacher got gradients (max %.3g)", tgrad);
    T_CHECK(moe_model_max_vio(te) == 0, "the teacher's expert loads moved (MaxVio %.3g)", moe_model_max_vio(te));
    T_CHECK(isfinite(p.total) && p.kl > 0 && p.ce > 0 && p.mtp[0] > 0 && p.rows == 16, "parts: total %g ce %g kl %g mtp %g rows %lld",
            p.total, p.ce, p.kl, p.mtp[0], (long long)p.rows);
    /* the teacher's activations are given back: the step's arena use is the student's plus
       the teacher's logits, not the teacher's whole forward */
    moe_ctx_reset(g_ctx);
    {
        moe_tensor *l2;
        moe_loss_parts lp;
        size_t plain;
        T_ASSERT(moe_model_loss(g_ctx, st, tok, 2, 8, &lo, &l2, &lp) == MOE_OK, "%s", moe_ctx_error(g_ctx));
        plain = moe_ctx_arena_used(g_ctx);
        T_CHECK(used[1] < plain + 64 * 1024, "arena after the distillation forward %zu, plain student loss %zu", used[1], plain);
        T_NOTE("arena per step: %zu bytes distilling, %zu plain (teacher activations dropped)", used[1], plain);
        moe_model_reset_loads(st);
    }
    /* a teacher identical to the student: KL 0 */
    moe_ctx_reset(g_ctx);
    T_ASSERT(moe_model_distill_loss(g_ctx, st, tw, tok, 2, 8, &lo, &o, &loss, &p) == MOE_OK, "%s", moe_ctx_error(g_ctx));
    T_CHECK(fabs(p.kl) < 1e-13, "identical teacher: KL %.3g", p.kl);
    /* errors */
    T_CHECK(moe_model_distill_loss(g_ctx, st, sv, tok, 2, 8, &lo, &o, &loss, &p) == MOE_ERR_CONFIG, "vocab 40 vs 41 accepted");
    T_NOTE("vocab mismatch: %s", moe_ctx_error(g_ctx));
    T_CHECK(moe_model_distill_loss(g_ctx, st, st, tok, 2, 8, &lo, &o, &loss, &p) == MOE_ERR_ARG, "teacher == student accepted");
    T_CHECK(moe_model_distill_loss(g_ctx, st, NULL, tok, 2, 8, &lo, &o, &loss, &p) == MOE_ERR_ARG, "NULL teacher accepted");
    /* offline with k = V: the same loss as online (up to the f32 storage of log-probs) */
    path_of(path, sizeof path, "model.cache");
    moe_ctx_reset(g_ctx);
    moe_ctx_set_grad_enabled(g_ctx, 0);
    {
        int32_t in[16];
        for (i = 0; i < 2; i++) memcpy(in + i * 8, tok + i * 9, 8 * sizeof(int32_t));
        T_ASSERT(moe_model_logits(g_ctx, te, in, 2, 8, &logits) == MOE_OK, "%s", moe_ctx_error(g_ctx));
    }
    moe_ctx_set_grad_enabled(g_ctx, 1);
    moe_model_reset_loads(te);
    T_ASSERT(moe_distill_writer_new(g_ctx, path, 40, 40, o.temperature, 0, &w) == MOE_OK, "%s", moe_ctx_error(g_ctx));
    T_ASSERT(moe_distill_writer_add(g_ctx, w, logits) == MOE_OK && moe_distill_writer_finish(g_ctx, w) == MOE_OK, "%s",
             moe_ctx_error(g_ctx));
    moe_distill_writer_free(w);
    moe_ctx_reset(g_ctx);
    T_ASSERT(moe_model_distill_loss(g_ctx, st, te, tok, 2, 8, &lo, &o, &loss, &p) == MOE_OK, "%s", moe_ctx_error(g_ctx));
    moe_ctx_reset(g_ctx);
    moe_model_reset_loads(st);
    T_ASSERT(moe_distill_cache_open(g_ctx, path, &c) == MOE_OK, "%s", moe_ctx_error(g_ctx));
    T_ASSERT(moe_model_distill_loss_cached(g_ctx, st, c, 0, tok, 2, 8, &lo, &o, &loss, &pc) == MOE_OK, "%s", moe_ctx_error(g_ctx));
    T_CHECK(fabs(p.kl - pc.kl) < 1e-5 && fabs(p.ce - pc.ce) < 1e-12, "online KL %.9g vs cached %.9g", p.kl, pc.kl);
    T_ASSERT(moe_backward(g_ctx, loss) == MOE_OK, "%s", moe_ctx_error(g_ctx));
    moe_ctx_reset(g_ctx);
    o.temperature = 3;
    T_CHECK(moe_model_distill_loss_cached(g_ctx, st, c, 0, tok, 2, 8, &lo, &o, &loss, &pc) == MOE_ERR_CONFIG,
            "a cache at T=2 used at T=3");
    T_NOTE("temperature mismatch: %s", moe_ctx_error(g_ctx));
    o.temperature = 2;
    T_CHECK(moe_model_distill_loss_cached(g_ctx, sv, c, 0, tok, 2, 8, &lo, &o, &loss, &pc) == MOE_ERR_CONFIG,
            "a vocab-40 cache used by a vocab-41 student");
    T_CHECK(moe_model_distill_loss_cached(g_ctx, st, c, 1, tok, 2, 8, &lo, &o, &loss, &pc) == MOE_ERR_ARG,
            "records 1..16 of 16 read");
    moe_distill_cache_close(c);
    moe_ctx_reset(g_ctx);
    remove(path);
    nw = 0;
    (void)nw;
    moe_model_free(g_ctx, st); moe_model_free(g_ctx, te); moe_model_free(g_ctx, tw); moe_model_free(g_ctx, sv);
}

int main(int argc, char **argv) {
    const char *tmp = getenv("TMPDIR");
    t_filter = argc > 1 ? argv[1] : NULL;
    snprintf(g_dir, sizeof g_dir, "%s", tmp && *tmp ? tmp : "/tmp");
    if (moe_ctx_new(&g_ctx) != MOE_OK) return 1;
    moe_ctx_set_threads(g_ctx, 2);
    T_RUN_FILTERED(test_gradcheck_online);
    T_RUN_FILTERED(test_gradcheck_topk);
    T_RUN_FILTERED(test_topk_matches_full);
    T_RUN_FILTERED(test_identical_zero);
    T_RUN_FILTERED(test_threads);
    T_RUN_FILTERED(test_cache_roundtrip);
    T_RUN_FILTERED(test_cache_bad_files);
    T_RUN_FILTERED(test_bad_args);
    T_RUN_FILTERED(test_model_online_and_cached);
    moe_ctx_free(g_ctx);
    return t_summary();
}
