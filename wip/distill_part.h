/* wip/distill_part.h — section 8b of moe.h: knowledge distillation.

   Two parts, separated by the IMPLEMENTATION line below:
     - the declarations: paste them after section 8's declarations (before section 9's);
     - the implementation: paste it after section 9's implementation (NOT after section 8's),
       before the `#include "moe_cuda.cuh"` at the end:
       the cache file code writes and verifies files the way section 9 does (temporary file,
       fsync, rename; FNV-1a checksum), and the model-level losses use section 7 internals
       (moe__model_trunk, moe__ids, moe__check_tokens, moe__block_forward, moe_model fields).
   The MTP part of moe__model_distill_student repeats moe_model_loss's MTP loop; if the lead factors
   that loop out of moe_model_loss into a helper, both can call it. */

/* ============================================================================================
   8b. distillation — a student learns from a frozen teacher's next-token distribution
   ============================================================================================
   L = α·CE(student, labels) + (1−α)·T²·KL, where KL compares the teacher's and the student's
   distributions at temperature T (the T² factor keeps the size of the KL gradient independent
   of T, as in Hinton et al. 2015). The teacher is a model run forward-only next to the student
   (online), or a file of its top-k log-probabilities per position written once (offline).
   Teacher and student must share the vocabulary; the teacher may be larger, dense or MoE. */

typedef enum moe_kl_dir {
    MOE_KL_FORWARD = 0, /* KL(p_teacher ‖ p_student): mass-covering, the usual choice */
    MOE_KL_REVERSE = 1  /* KL(p_student ‖ p_teacher): mode-seeking */
} moe_kl_dir;

typedef struct moe_distill_opts {
    float alpha;          /* weight of the hard-label cross-entropy, in [0, 1] */
    float temperature;    /* T > 0 of both distributions in the KL term */
    moe_kl_dir direction; /* which KL */
    int32_t ignore_index; /* rows whose label is this take part in neither term */
} moe_distill_opts;
/* alpha 0.5, temperature 2, forward KL, ignore_index −1: what a NULL opts means. */
MOE_API moe_distill_opts moe_distill_defaults(void);

/* What a distillation loss was made of; ce and kl are means over the rows that count. */
typedef struct moe_distill_parts {
    double total;          /* the loss (MTP and balance terms included at model level) */
    double ce;             /* hard-label cross-entropy of the student at T = 1 (nats) */
    double kl;             /* KL at temperature T, before the T² factor */
    double mtp[4], balance;
    int64_t rows;          /* rows that counted */
} moe_distill_parts;

/* The loss from full teacher logits. student_logits: [..., V], differentiable; teacher_logits:
   the same shape, never differentiated; labels: MOE_I32 [...] (may be NULL when alpha is 0:
   then every row counts). parts may be NULL. */
MOE_API moe_status moe_distill_loss(moe_ctx *ctx, moe_tensor *student_logits, moe_tensor *teacher_logits,
                                    moe_tensor *labels, const moe_distill_opts *opts, moe_tensor **loss,
                                    moe_distill_parts *parts);
/* The loss from the teacher's top-k: top_ids MOE_I32 [rows, k] (distinct, in [0, V)), top_logp
   [rows, k] (teacher log-probabilities at T) and tail [rows] (the teacher's mass outside the k
   ids). The tail is one bucket, compared with the student's mass outside the same k ids. */
MOE_API moe_status moe_distill_loss_topk(moe_ctx *ctx, moe_tensor *student_logits, moe_tensor *top_ids,
                                         moe_tensor *top_logp, moe_tensor *tail, moe_tensor *labels,
                                         const moe_distill_opts *opts, moe_tensor **loss, moe_distill_parts *parts);

/* The student's training loss on tokens [B, T+1] with a teacher model: moe_model_loss with the
   main cross-entropy replaced by the distillation loss (MTP and balance terms as lopts says).
   The teacher runs forward-only (no tape; its activations are dropped as soon as its logits
   are taken) and its expert-load counters are left as they were. */
MOE_API moe_status moe_model_distill_loss(moe_ctx *ctx, moe_model *student, moe_model *teacher, const int32_t *tokens,
                                          int64_t batch, int64_t seq, const moe_loss_opts *lopts,
                                          const moe_distill_opts *dopts, moe_tensor **loss, moe_distill_parts *parts);

/* ---- the top-k teacher cache ----
   A file of one record per position: the teacher's k most likely token ids, their
   log-probabilities at temperature T, and the probability mass left over. Header: magic,
   version, vocab, k, count, T, a caller's tag (e.g. a hash of the data settings) and an FNV-1a
   checksum over header and records. Written through a temporary file renamed into place. */
typedef struct moe_distill_writer moe_distill_writer;
typedef struct moe_distill_cache moe_distill_cache;
typedef struct moe_distill_info {
    int64_t vocab, k, count; /* count: records (positions) in the file */
    float temperature;
    uint64_t tag;
} moe_distill_info;

/* Start a cache for `path` (nothing appears there until moe_distill_writer_finish). */
MOE_API moe_status moe_distill_writer_new(moe_ctx *ctx, const char *path, int64_t vocab, int64_t k, float temperature,
                                          uint64_t tag, moe_distill_writer **out);
/* Append one record per row of teacher logits [..., vocab], in row order. */
MOE_API moe_status moe_distill_writer_add(moe_ctx *ctx, moe_distill_writer *w, const moe_tensor *teacher_logits);
/* Write the header (count, checksum), fsync and rename the file into place. */
MOE_API moe_status moe_distill_writer_finish(moe_ctx *ctx, moe_distill_writer *w);
/* Free the writer; an unfinished file is removed. */
MOE_API void moe_distill_writer_free(moe_distill_writer *w);

/* Open a cache: the header must be valid, the size must match count records exactly and the
   checksum must match (the whole file is read once to check it). */
MOE_API moe_status moe_distill_cache_open(moe_ctx *ctx, const char *path, moe_distill_cache **out);
MOE_API void moe_distill_cache_close(moe_distill_cache *cache);
/* The header's figures (all zero for NULL). */
MOE_API moe_distill_info moe_distill_cache_info(const moe_distill_cache *cache);
/* Records [first, first + rows) as step-arena tensors ids [rows, k], logp [rows, k] and
   tail [rows], the inputs of moe_distill_loss_topk. Reads only those records. */
MOE_API moe_status moe_distill_cache_read(moe_ctx *ctx, moe_distill_cache *cache, int64_t first, int64_t rows,
                                          moe_tensor **ids, moe_tensor **logp, moe_tensor **tail);
/* moe_model_distill_loss with the teacher read from the cache: records [first, first + B·T)
   hold the teacher at the B·T input positions of tokens, row-major. The cache's temperature
   must equal dopts' and its vocabulary the student's. */
MOE_API moe_status moe_model_distill_loss_cached(moe_ctx *ctx, moe_model *student, moe_distill_cache *cache,
                                                 int64_t first, const int32_t *tokens, int64_t batch, int64_t seq,
                                                 const moe_loss_opts *lopts, const moe_distill_opts *dopts,
                                                 moe_tensor **loss, moe_distill_parts *parts);

/* ==== IMPLEMENTATION ==== */

/* ============================================================================================
   8b. distillation
   ============================================================================================
   Notation for one row (position): a = z_s/T the student's tempered logits, q = softmax(a);
   p the teacher's distribution at T. With per-row loss ℓ = α·CE + (1−α)·T²·KL and
   dℓ/dz_s = (1/T)·dℓ/da, the KL gradients that the backward uses are
     forward  KL(p‖q) = Σ p (log p − log q):  dKL/da_j = q_j − p_j
     reverse  KL(q‖p) = Σ q (log q − log p):  dKL/da_j = q_j (log q_j − log p_j − KL)
   so T²·KL contributes (1−α)·T·dKL/da_j to dℓ/dz_j.

   Top-k teacher (ids S, log-probs lp_i at T, tail mass p_R = 1 − Σ_S p_i): the distributions
   are compared over the k+1 buckets S ∪ {R}, with the student's tail q_R = Σ_{j∉S} q_j taken
   in log space (log q_R = lse_{j∉S} a_j − lse_j a_j) so that it never cancels:
     forward  KL = Σ_S p_i (lp_i − log q_i) + p_R (log p_R − log q_R)
              dKL/da_j = P·q_j − p_j            (j ∈ S)
                         P·q_j − p_R·q_j/q_R    (j ∉ S),  P = Σ_S p_i + p_R (1 up to rounding)
              i.e. the teacher's tail mass is spread over the tail in the student's proportions;
     reverse  KL = Σ_S q_i (log q_i − lp_i) + q_R (log q_R − log p_R)
              dKL/da_j = q_j (log q_j − lp_j − KL)   (j ∈ S)
                         q_j (log q_R − log p_R − KL) (j ∉ S).
   In the reverse direction p_R is floored at MOE__DISTILL_TAIL_FLOOR so that a teacher whose
   tail underflowed to 0 gives a large but finite loss. With k = V there is no tail bucket. */

#define MOE__DISTILL_TAIL_FLOOR 1e-30

MOE_API moe_distill_opts moe_distill_defaults(void) {
    moe_distill_opts o;
    memset(&o, 0, sizeof o);
    o.alpha = 0.5f;
    o.temperature = 2.0f;
    o.direction = MOE_KL_FORWARD;
    o.ignore_index = -1;
    return o;
}

static moe_status moe__distill_opts(moe_ctx *ctx, const char *fn, const moe_distill_opts *in, moe_distill_opts *o) {
    *o = in ? *in : moe_distill_defaults();
    if (!(o->alpha >= 0.0f && o->alpha <= 1.0f))
        return moe__fail(ctx, MOE_ERR_ARG, "%s: alpha must be in [0, 1], got %g", fn, (double)o->alpha);
    if (!(o->temperature > 0.0f) || !isfinite(o->temperature))
        return moe__fail(ctx, MOE_ERR_ARG, "%s: temperature must be a finite number > 0, got %g (start from moe_distill_defaults())",
                         fn, (double)o->temperature);
    if (o->direction != MOE_KL_FORWARD && o->direction != MOE_KL_REVERSE)
        return moe__fail(ctx, MOE_ERR_ARG, "%s: direction must be MOE_KL_FORWARD or MOE_KL_REVERSE, got %d", fn, (int)o->direction);
    return MOE_OK;
}

/* Log-sum-exp of s·x[j] over j < n, skipping ids marked in `skip` (NULL: none); −inf when
   every id is skipped. */
static moe_real moe__distill_lse(const moe_real *x, int64_t n, moe_real s, const unsigned char *skip) {
    moe_real m = -(moe_real)INFINITY, sum = 0;
    int64_t j;
    for (j = 0; j < n; j++)
        if (!(skip && skip[j]) && s * x[j] > m) m = s * x[j];
    if (m == -(moe_real)INFINITY) return m;
    for (j = 0; j < n; j++)
        if (!(skip && skip[j])) sum += moe__exp(s * x[j] - m);
    return m + moe__ln(sum);
}

/* Everything a distillation node needs: the options, the teacher (full logits, or top-k
   arrays), the labels and what the forward saved per row. Lives in the step arena; the
   teacher's and the labels' tensors must live until the backward, like any op input. */
typedef struct moe__distill {
    moe_distill_opts o;
    int64_t V, rows, k, count; /* k = 0: online (full teacher logits) */
    const moe_real *zt;        /* online: teacher logits [rows, V] */
    const int32_t *ids;        /* top-k: ids [rows, k], logp [rows, k], tail [rows] */
    const moe_real *logp, *tail;
    const int32_t *labels;     /* NULL: every row counts, no CE */
    moe_real *lse1;            /* student log-sum-exp at T = 1 (CE) */
    moe_real *lseT;            /* student log-sum-exp of a = z/T */
    moe_real *lseX;            /* online: the teacher's lse of z_t/T; top-k: the student's tail lse */
    moe_real *kl;              /* per-row KL (the reverse gradient needs it) */
    unsigned char *mark;       /* top-k: one V-byte marker per row chunk, all zero between rows */
    int64_t nchunks;
} moe__distill;

static int moe__distill_counts(const moe__distill *D, int64_t r) {
    return !D->labels || D->labels[r] != D->o.ignore_index;
}

/* Forward of rows [r0, r1): per-row CE (at T = 1) into ce[r], KL (at T) into D->kl[r]. */
static void moe__distill_rows_fwd(const moe__distill *D, const moe_real *zs, int64_t r0, int64_t r1, unsigned char *mark,
                                  moe_real *ce) {
    const int64_t V = D->V, k = D->k;
    const moe_real invT = (moe_real)1 / (moe_real)D->o.temperature;
    const int fwd = D->o.direction == MOE_KL_FORWARD;
    int64_t r, j, i;
    for (r = r0; r < r1; r++) {
        const moe_real *x = zs + r * V;
        moe_real lseT, kr = 0;
        ce[r] = 0;
        D->kl[r] = 0;
        if (!moe__distill_counts(D, r)) continue;
        if (D->labels) {
            D->lse1[r] = moe__distill_lse(x, V, 1, NULL);
            ce[r] = D->lse1[r] - x[D->labels[r]];
        }
        lseT = D->lseT[r] = moe__distill_lse(x, V, invT, NULL);
        if (!k) {
            const moe_real *y = D->zt + r * V;
            moe_real lset = D->lseX[r] = moe__distill_lse(y, V, invT, NULL);
            for (j = 0; j < V; j++) {
                moe_real lp = invT * y[j] - lset, lq = invT * x[j] - lseT;
                kr += fwd ? moe__exp(lp) * (lp - lq) : moe__exp(lq) * (lq - lp);
            }
        } else {
            const int32_t *ids = D->ids + r * k;
            const moe_real *lp = D->logp + r * k, pR = D->tail[r];
            moe_real lseR, lqR;
            for (i = 0; i < k; i++) mark[ids[i]] = 1;
            lseR = D->lseX[r] = k < V ? moe__distill_lse(x, V, invT, mark) : -(moe_real)INFINITY;
            for (i = 0; i < k; i++) mark[ids[i]] = 0;
            lqR = lseR - lseT;
            for (i = 0; i < k; i++) {
                moe_real lq = invT * x[ids[i]] - lseT;
                kr += fwd ? moe__exp(lp[i]) * (lp[i] - lq) : moe__exp(lq) * (lq - lp[i]);
            }
            if (k < V) {
                if (fwd) {
                    if (pR > 0) kr += pR * (moe__ln(pR) - lqR);
                } else {
                    moe_real lpR = moe__ln(pR > (moe_real)MOE__DISTILL_TAIL_FLOOR ? pR : (moe_real)MOE__DISTILL_TAIL_FLOOR);
                    kr += moe__exp(lqR) * (lqR - lpR);
                }
            }
        }
        D->kl[r] = kr;
    }
}

/* Backward of rows [r0, r1): dz += scale·(α·(softmax(z) − onehot) + (1−α)·T·dKL/da). */
static void moe__distill_rows_bwd(const moe__distill *D, const moe_real *zs, int64_t r0, int64_t r1, unsigned char *mark,
                                  moe_real scale, moe_real *dz) {
    const int64_t V = D->V, k = D->k;
    const moe_real T = (moe_real)D->o.temperature, invT = (moe_real)1 / T, alpha = (moe_real)D->o.alpha;
    const moe_real ks = scale * (1 - alpha) * T;
    const int fwd = D->o.direction == MOE_KL_FORWARD;
    int64_t r, j, i;
    for (r = r0; r < r1; r++) {
        const moe_real *x = zs + r * V;
        moe_real *d = dz + r * V, lseT = D->lseT[r], klr = D->kl[r];
        if (!moe__distill_counts(D, r)) continue;
        if (D->labels && alpha > 0) {
            moe_real cs = scale * alpha, l1 = D->lse1[r];
            for (j = 0; j < V; j++) d[j] += cs * moe__exp(x[j] - l1);
            d[D->labels[r]] -= cs;
        }
        if (ks == 0) continue;
        if (!k) {
            const moe_real *y = D->zt + r * V;
            moe_real lset = D->lseX[r];
            for (j = 0; j < V; j++) {
                moe_real lp = invT * y[j] - lset, lq = invT * x[j] - lseT, q = moe__exp(lq);
                d[j] += ks * (fwd ? q - moe__exp(lp) : q * (lq - lp - klr));
            }
        } else {
            const int32_t *ids = D->ids + r * k;
            const moe_real *lp = D->logp + r * k, pR = D->tail[r], lseR = D->lseX[r], lqR = lseR - lseT;
            const moe_real lpR = moe__ln(pR > (moe_real)MOE__DISTILL_TAIL_FLOOR ? pR : (moe_real)MOE__DISTILL_TAIL_FLOOR);
            moe_real P = pR;
            for (i = 0; i < k; i++) {
                P += moe__exp(lp[i]);
                mark[ids[i]] = 1;
            }
            if (k < V) /* the tail bucket: ids outside S */
                for (j = 0; j < V; j++) {
                    moe_real q;
                    if (mark[j]) continue;
                    q = moe__exp(invT * x[j] - lseT);
                    /* q_j/q_R = exp(a_j − lse_tail): no division by a tail that may underflow */
                    d[j] += ks * (fwd ? P * q - pR * moe__exp(invT * x[j] - lseR) : q * (lqR - lpR - klr));
                }
            for (i = 0; i < k; i++) {
                int32_t id = ids[i];
                moe_real lq = invT * x[id] - lseT, q = moe__exp(lq);
                mark[id] = 0;
                d[id] += ks * (fwd ? P * q - moe__exp(lp[i]) : q * (lq - lp[i] - klr));
            }
        }
    }
}

/* Rows are cut into nchunks contiguous chunks (at most one per thread), each with its own
   marker; a row's values depend on that row alone, so the split changes nothing. */
static void moe__distill_chunk(const moe__distill *D, int64_t c, int64_t *r0, int64_t *r1) {
    *r0 = D->rows * c / D->nchunks;
    *r1 = D->rows * (c + 1) / D->nchunks;
}

static moe_status moe__distill_bwd_node(moe_ctx *ctx, moe__node *n) {
    moe_tensor *zs = n->in[0];
    const moe__distill *D = (const moe__distill *)n->saved;
    moe_real *dz, scale;
    int64_t c;
    MOE__GRAD_OR_FAIL(dz, ctx, zs);
    if (D->count == 0) return MOE_OK; /* no row counted: the loss is constant 0 */
    scale = MOE__F32(n->out->grad)[0] / (moe_real)D->count;
    MOE__OMP(omp parallel for num_threads(ctx->n_threads) schedule(static) if (D->rows * D->V > 16384))
    for (c = 0; c < D->nchunks; c++) {
        int64_t r0, r1;
        moe__distill_chunk(D, c, &r0, &r1);
        moe__distill_rows_bwd(D, MOE__F32(zs), r0, r1, D->mark ? D->mark + c * D->V : NULL, scale, dz);
    }
    return MOE_OK;
}

/* The shared body of both loss ops once D holds the teacher. */
static moe_status moe__distill_run(moe_ctx *ctx, const char *fn, moe__distill *D, moe_tensor *zs, moe_tensor **loss,
                                   moe_distill_parts *parts) {
    moe_real *ce, T2 = (moe_real)D->o.temperature * (moe_real)D->o.temperature, a = (moe_real)D->o.alpha;
    double ce_sum = 0, kl_sum = 0, total;
    int64_t r, c, one = 1;
    moe__node *n;
    D->nchunks = D->rows < ctx->n_threads ? D->rows : ctx->n_threads;
    if (D->nchunks < 1) D->nchunks = 1;
    ce = (moe_real *)moe__arena_alloc(ctx, (size_t)D->rows, sizeof(moe_real), fn);
    D->lse1 = (moe_real *)moe__arena_alloc(ctx, (size_t)D->rows, sizeof(moe_real), fn);
    D->lseT = (moe_real *)moe__arena_alloc(ctx, (size_t)D->rows, sizeof(moe_real), fn);
    D->lseX = (moe_real *)moe__arena_alloc(ctx, (size_t)D->rows, sizeof(moe_real), fn);
    D->kl = (moe_real *)moe__arena_alloc(ctx, (size_t)D->rows, sizeof(moe_real), fn);
    if (!ce || !D->lse1 || !D->lseT || !D->lseX || !D->kl) return MOE_ERR_MEMORY;
    if (D->k) {
        size_t nm;
        if (moe__mul_overflows((size_t)D->nchunks, (size_t)D->V, &nm)) return moe__fail(ctx, MOE_ERR_MEMORY, "%s: size overflows", fn);
        D->mark = (unsigned char *)moe__arena_alloc(ctx, nm, 1, fn);
        if (!D->mark) return MOE_ERR_MEMORY;
    }
    MOE__OMP(omp parallel for num_threads(ctx->n_threads) schedule(static) if (D->rows * D->V > 16384))
    for (c = 0; c < D->nchunks; c++) {
        int64_t r0, r1;
        moe__distill_chunk(D, c, &r0, &r1);
        moe__distill_rows_fwd(D, MOE__F32(zs), r0, r1, D->mark ? D->mark + c * D->V : NULL, ce);
    }
    D->count = 0;
    for (r = 0; r < D->rows; r++) { /* fixed order: the same sum for any thread count */
        if (!moe__distill_counts(D, r)) continue;
        ce_sum += (double)ce[r];
        kl_sum += (double)D->kl[r];
        D->count++;
    }
    if (!isfinite(ce_sum) || !isfinite(kl_sum))
        return moe__fail(ctx, MOE_ERR_NUMERIC, "%s: the loss is not finite (CE %g, KL %g): non-finite logits?", fn, ce_sum, kl_sum);
    total = D->count ? (double)a * ce_sum / (double)D->count + (double)((1 - a) * T2) * kl_sum / (double)D->count : 0.0;
    MOE__TRY(moe_tensor_temp(ctx, MOE_F32, 1, &one, loss));
    MOE__F32(*loss)[0] = (moe_real)total;
    if (parts) {
        memset(parts, 0, sizeof *parts);
        parts->total = total;
        parts->ce = D->labels && D->count ? ce_sum / (double)D->count : 0;
        parts->kl = D->count ? kl_sum / (double)D->count : 0;
        parts->rows = D->count;
    }
    MOE__TRY(moe__record(ctx, moe__distill_bwd_node, *loss, zs, NULL, NULL, &n));
    if (n) n->saved = D;
    return MOE_OK;
}

/* Checks shared by both ops: student logits, labels, options; fills D's common fields. */
static moe_status moe__distill_begin(moe_ctx *ctx, const char *fn, moe_tensor *zs, moe_tensor *labels,
                                     const moe_distill_opts *opts, moe_tensor **loss, moe__distill **out) {
    moe__distill *D = NULL;
    moe_distill_opts o;
    MOE__TRY(moe__check_out(ctx, fn, loss));
    MOE__TRY(moe__check_f32(ctx, fn, zs, "student_logits"));
    MOE__TRY(moe__distill_opts(ctx, fn, opts, &o));
    if (!labels && o.alpha > 0)
        return moe__fail(ctx, MOE_ERR_ARG, "%s: labels are NULL but alpha is %g (NULL labels need alpha 0)", fn, (double)o.alpha);
    if (labels) {
        MOE__TRY(moe__check_i32(ctx, fn, labels, "labels"));
        if (labels->numel * MOE__LAST(zs) != zs->numel) return moe__shape_mismatch(ctx, fn, zs, labels);
        MOE__TRY(moe__check_ids(ctx, fn, labels, MOE__LAST(zs), o.ignore_index));
    }
    D = (moe__distill *)moe__arena_alloc(ctx, 1, sizeof *D, fn);
    if (!D) return MOE_ERR_MEMORY;
    D->o = o;
    D->V = MOE__LAST(zs);
    D->rows = zs->numel / D->V;
    D->labels = labels ? MOE__I32(labels) : NULL;
    *out = D;
    return MOE_OK;
}

MOE_API moe_status moe_distill_loss(moe_ctx *ctx, moe_tensor *student_logits, moe_tensor *teacher_logits,
                                    moe_tensor *labels, const moe_distill_opts *opts, moe_tensor **loss,
                                    moe_distill_parts *parts) {
    static const char *fn = "moe_distill_loss";
    moe__distill *D = NULL;
    int d;
    MOE__TRY(moe__distill_begin(ctx, fn, student_logits, labels, opts, loss, &D));
    MOE__TRY(moe__check_f32(ctx, fn, teacher_logits, "teacher_logits"));
    if (MOE__LAST(teacher_logits) != D->V)
        return moe__fail(ctx, MOE_ERR_SHAPE, "%s: the teacher's vocabulary (%lld) differs from the student's (%lld): "
                         "distillation needs the same vocabulary", fn, (long long)MOE__LAST(teacher_logits), (long long)D->V);
    if (teacher_logits->ndim != student_logits->ndim) return moe__shape_mismatch(ctx, fn, student_logits, teacher_logits);
    for (d = 0; d < teacher_logits->ndim; d++)
        if (teacher_logits->shape[d] != student_logits->shape[d]) return moe__shape_mismatch(ctx, fn, student_logits, teacher_logits);
    D->zt = MOE__F32(teacher_logits);
    return moe__distill_run(ctx, fn, D, student_logits, loss, parts);
}

/* Checks of a top-k teacher: ids in range and distinct within a row, log-probabilities
   finite and ≤ 0, tail in [0, 1], and the k + 1 masses summing to 1 within 1e-3. */
static moe_status moe__distill_check_topk(moe_ctx *ctx, const char *fn, moe_status err, int64_t first, const int32_t *ids,
                                          const moe_real *logp, const moe_real *tail, int64_t rows, int64_t k, int64_t V,
                                          unsigned char *mark) {
    int64_t r, i;
    for (r = 0; r < rows; r++) {
        const int32_t *id = ids + r * k;
        const moe_real *lp = logp + r * k;
        double mass = (double)tail[r];
        const char *bad = NULL;
        if (!(tail[r] >= 0 && tail[r] <= 1)) bad = "a tail mass outside [0, 1]";
        for (i = 0; i < k && !bad; i++) {
            if (id[i] < 0 || id[i] >= V) bad = "a token id outside the vocabulary";
            else if (mark[id[i]]) bad = "a repeated token id";
            else if (!(lp[i] <= 1e-6) || !isfinite(lp[i])) bad = "a log-probability that is not finite and <= 0";
            else {
                mark[id[i]] = 1;
                mass += exp((double)lp[i]);
            }
        }
        for (i = 0; i < k; i++)
            if (id[i] >= 0 && id[i] < V) mark[id[i]] = 0;
        if (!bad && fabs(mass - 1.0) > 1e-3) bad = "top-k and tail masses that do not sum to 1";
        if (bad)
            return moe__fail(ctx, err, "%s: teacher record %lld has %s", fn, (long long)(first + r), bad);
    }
    return MOE_OK;
}

MOE_API moe_status moe_distill_loss_topk(moe_ctx *ctx, moe_tensor *student_logits, moe_tensor *top_ids,
                                         moe_tensor *top_logp, moe_tensor *tail, moe_tensor *labels,
                                         const moe_distill_opts *opts, moe_tensor **loss, moe_distill_parts *parts) {
    static const char *fn = "moe_distill_loss_topk";
    moe__distill *D = NULL;
    unsigned char *mark;
    int64_t k;
    MOE__TRY(moe__distill_begin(ctx, fn, student_logits, labels, opts, loss, &D));
    MOE__TRY(moe__check_i32(ctx, fn, top_ids, "top_ids"));
    MOE__TRY(moe__check_f32(ctx, fn, top_logp, "top_logp"));
    MOE__TRY(moe__check_f32(ctx, fn, tail, "tail"));
    k = MOE__LAST(top_ids);
    if (tail->numel != D->rows) return moe__shape_mismatch(ctx, fn, student_logits, tail);
    if (k < 1 || k > D->V || top_ids->numel != D->rows * k)
        return moe__fail(ctx, MOE_ERR_SHAPE, "%s: top_ids must be [rows = %lld, k] with 1 <= k <= vocab (%lld), got %lld elements "
                         "with last dim %lld", fn, (long long)D->rows, (long long)D->V, (long long)top_ids->numel, (long long)k);
    if (top_logp->numel != top_ids->numel || MOE__LAST(top_logp) != k) return moe__shape_mismatch(ctx, fn, top_ids, top_logp);
    mark = (unsigned char *)moe__arena_alloc(ctx, (size_t)D->V, 1, fn);
    if (!mark) return MOE_ERR_MEMORY;
    MOE__TRY(moe__distill_check_topk(ctx, fn, MOE_ERR_ARG, 0, MOE__I32(top_ids), MOE__F32(top_logp), MOE__F32(tail), D->rows, k,
                                     D->V, mark));
    D->k = k;
    D->ids = MOE__I32(top_ids);
    D->logp = MOE__F32(top_logp);
    D->tail = MOE__F32(tail);
    return moe__distill_run(ctx, fn, D, student_logits, loss, parts);
}

/* ---- model-level losses ---- */

/* The teacher's logits [B, T, V] for the inputs of tokens [B, T+1], run forward-only. The
   result is allocated first; the teacher's activations after it are given back to the step
   arena as soon as the logits are copied out (when the arena did not need a new block meanwhile,
   which is every step once the first has sized it). The teacher's expert-load counters are
   restored: a frozen teacher must not drift with the student's balancing. */
static moe_status moe__distill_teacher_logits(moe_ctx *ctx, moe_model *teacher, const int32_t *tokens, int64_t B, int64_t T,
                                              moe_tensor **out) {
    const moe_config *c = &teacher->cfg;
    int64_t shape[3], nl = (c->num_hidden_layers - c->first_k_dense_replace + c->num_nextn_predict_layers) * c->n_routed_experts;
    int64_t *loads0;
    moe_tensor *tl, *ids, *h = NULL, *lg = NULL, *aux = NULL;
    moe__arena_block *b0;
    size_t used0, all0;
    int grad0 = ctx->grad_enabled;
    moe_status s;
    shape[0] = B; shape[1] = T; shape[2] = c->vocab_size;
    MOE__TRY(moe_tensor_temp(ctx, MOE_F32, 3, shape, &tl));
    loads0 = (int64_t *)moe__arena_alloc(ctx, (size_t)(nl > 0 ? nl : 1), sizeof(int64_t), "distill teacher");
    if (!loads0) return MOE_ERR_MEMORY;
    if (nl > 0) memcpy(loads0, teacher->loads, (size_t)nl * sizeof(int64_t));
    b0 = ctx->arena;
    used0 = b0 ? b0->used : 0;
    all0 = ctx->arena_used;
    ctx->grad_enabled = 0; /* inference mode: nothing goes on the tape */
    s = moe__ids(ctx, tokens, B, T, T + 1, 0, &ids);
    if (s == MOE_OK) s = moe__model_trunk(ctx, teacher, ids, B, T, 0.0f, &h, &aux);
    if (s == MOE_OK) s = moe_matmul(ctx, h, teacher->head, &lg);
    if (s == MOE_OK) memcpy(tl->data, lg->data, (size_t)tl->numel * sizeof(moe_real));
    ctx->grad_enabled = grad0;
    if (nl > 0) memcpy(teacher->loads, loads0, (size_t)nl * sizeof(int64_t));
    if (b0 && ctx->arena == b0) {
        b0->used = used0;
        ctx->arena_used = all0;
    }
    if (s != MOE_OK) return s;
    *out = tl;
    return MOE_OK;
}

/* The student's side: trunk, head and the distillation loss against the teacher (full logits
   tl, or the top-k ids/logp/tail), then the MTP and balance terms as moe_model_loss adds them
   (MTP modules learn from the hard labels: the teacher has no prediction for token i+k+1). */
static moe_status moe__model_distill_student(moe_ctx *ctx, const char *fn, moe_model *m, const int32_t *tokens, int64_t B,
                                             int64_t T, const moe_loss_opts *lopts, const moe_distill_opts *dopts,
                                             moe_tensor *tl, moe_tensor *tids, moe_tensor *tlogp, moe_tensor *ttail,
                                             moe_tensor **loss, moe_distill_parts *parts) {
    const moe_config *c = &m->cfg;
    moe_tensor *ids, *tgt, *h, *logits, *dl, *aux = NULL, *mtp_sum = NULL, *hprev;
    moe_distill_parts dp;
    moe_loss_opts o;
    int64_t k, D;
    memset(&o, 0, sizeof o);
    if (lopts) o = *lopts;
    if (!(o.mtp_lambda >= 0) || !(o.balance_alpha >= 0)) return moe__fail(ctx, MOE_ERR_ARG, "%s: mtp_lambda and balance_alpha must be >= 0", fn);
    MOE__TRY(moe__ids(ctx, tokens, B, T, T + 1, 0, &ids));
    MOE__TRY(moe__ids(ctx, tokens, B, T, T + 1, 1, &tgt));
    MOE__TRY(moe__model_trunk(ctx, m, ids, B, T, o.balance_alpha, &h, &aux));
    MOE__TRY(moe_matmul(ctx, h, m->head, &logits));
    if (tl) MOE__TRY(moe_distill_loss(ctx, logits, tl, tgt, dopts, &dl, &dp));
    else MOE__TRY(moe_distill_loss_topk(ctx, logits, tids, tlogp, ttail, tgt, dopts, &dl, &dp));
    *loss = dl;
    /* MTP (reference §4), the same terms as moe_model_loss */
    D = o.mtp_lambda > 0 ? c->num_nextn_predict_layers : 0;
    hprev = h;
    for (k = 1; k <= D && T - k >= 1; k++) {
        moe__mtp *t = &m->mtp[k - 1];
        int64_t Tk = T - k;
        moe_tensor *hin = hprev, *rest, *eids, *e, *en, *hn, *cat, *hp, *hk, *a, *kn, *lg, *ktg, *cek;
        if (hprev->shape[1] > Tk) MOE__TRY(moe_split(ctx, hprev, 1, Tk, &hin, &rest));
        MOE__TRY(moe__ids(ctx, tokens, B, Tk, T + 1, k, &eids));
        MOE__TRY(moe_embedding(ctx, m->embed, eids, &e));
        MOE__TRY(moe_rmsnorm(ctx, e, t->enorm, (float)c->rms_norm_eps, &en));
        MOE__TRY(moe_rmsnorm(ctx, hin, t->hnorm, (float)c->rms_norm_eps, &hn));
        MOE__TRY(moe_concat(ctx, en, hn, 2, &cat));
        MOE__TRY(moe_matmul(ctx, cat, t->eh_proj, &hp));
        MOE__TRY(moe__block_forward(ctx, m, &t->block, hp, B, Tk, o.balance_alpha, &hk, &a));
        if (a && o.balance_alpha > 0) {
            if (aux) MOE__TRY(moe_add(ctx, aux, a, &aux));
            else aux = a;
        }
        MOE__TRY(moe_rmsnorm(ctx, hk, t->head_norm, (float)c->rms_norm_eps, &kn));
        MOE__TRY(moe_matmul(ctx, kn, m->head, &lg));
        MOE__TRY(moe__ids(ctx, tokens, B, Tk, T + 1, k + 1, &ktg));
        MOE__TRY(moe_cross_entropy(ctx, lg, ktg, -1, &cek));
        dp.mtp[k - 1] = moe_tensor_get(cek, 0);
        MOE__TRY(moe_scale(ctx, cek, (float)Tk / (float)T, &cek));
        if (mtp_sum) MOE__TRY(moe_add(ctx, mtp_sum, cek, &mtp_sum));
        else mtp_sum = cek;
        hprev = hk;
    }
    if (mtp_sum) {
        MOE__TRY(moe_scale(ctx, mtp_sum, o.mtp_lambda / (float)D, &mtp_sum));
        MOE__TRY(moe_add(ctx, *loss, mtp_sum, loss));
    }
    if (aux) {
        dp.balance = moe_tensor_get(aux, 0);
        MOE__TRY(moe_add(ctx, *loss, aux, loss));
    }
    dp.total = moe_tensor_get(*loss, 0);
    if (parts) *parts = dp;
    return MOE_OK;
}

MOE_API moe_status moe_model_distill_loss(moe_ctx *ctx, moe_model *student, moe_model *teacher, const int32_t *tokens,
                                          int64_t batch, int64_t seq, const moe_loss_opts *lopts,
                                          const moe_distill_opts *dopts, moe_tensor **loss, moe_distill_parts *parts) {
    static const char *fn = "moe_model_distill_loss";
    moe_tensor *tl;
    moe_distill_opts o;
    MOE__TRY(moe__check_out(ctx, fn, loss));
    MOE__TRY(moe__check_tokens(ctx, fn, student, tokens, batch, seq, batch * (seq + 1)));
    if (!teacher) return moe__fail(ctx, MOE_ERR_ARG, "%s: teacher is NULL", fn);
    if (teacher == student) return moe__fail(ctx, MOE_ERR_ARG, "%s: the teacher is the student itself", fn);
    if (teacher->cfg.vocab_size != student->cfg.vocab_size)
        return moe__fail(ctx, MOE_ERR_CONFIG, "%s: the teacher's vocabulary (%lld) differs from the student's (%lld): "
                         "distillation needs the same vocabulary", fn, (long long)teacher->cfg.vocab_size,
                         (long long)student->cfg.vocab_size);
    MOE__TRY(moe__check_tokens(ctx, fn, teacher, tokens, batch, seq, batch * (seq + 1)));
    MOE__TRY(moe__distill_opts(ctx, fn, dopts, &o));
    MOE__TRY(moe__distill_teacher_logits(ctx, teacher, tokens, batch, seq, &tl));
    return moe__model_distill_student(ctx, fn, student, tokens, batch, seq, lopts, &o, tl, NULL, NULL, NULL, loss, parts);
}

/* ---- the top-k teacher cache ----
   Layout (little-endian):
     0  "MOEDSTL1"         8  u32 version (1)     12 u32 k
     16 u64 vocab          24 u64 count           32 f32 temperature    36 u32 0
     40 u64 tag            48 u64 0               56 u64 checksum
     64 count records of 8k + 4 bytes: k × u32 id (most likely first), k × f32 log-prob at T,
        f32 tail mass (the teacher's probability outside the k ids, summed directly, not as
        1 − Σ top-k, so that a small tail keeps its relative precision).
   The checksum is FNV-1a over the records followed by header bytes 0..55, so the writer can
   hash records as they stream out and add the header, whose count it knows only at the end. */

#define MOE__DISTILL_MAGIC "MOEDSTL1"
#define MOE__DISTILL_VERSION 1u
#define MOE__DISTILL_HDR 64

static uint64_t moe__distill_fnv(uint64_t h, const unsigned char *p, size_t n) {
    size_t i;
    for (i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001B3ull;
    return h;
}
static void moe__distill_put32(unsigned char *p, uint32_t v) {
    int i;
    for (i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static void moe__distill_put64(unsigned char *p, uint64_t v) {
    int i;
    for (i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static uint32_t moe__distill_get32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t moe__distill_get64(const unsigned char *p) {
    return (uint64_t)moe__distill_get32(p) | (uint64_t)moe__distill_get32(p + 4) << 32;
}
static void moe__distill_header(unsigned char *h, const moe_distill_info *in) {
    uint32_t tb;
    memset(h, 0, MOE__DISTILL_HDR);
    memcpy(h, MOE__DISTILL_MAGIC, 8);
    moe__distill_put32(h + 8, MOE__DISTILL_VERSION);
    moe__distill_put32(h + 12, (uint32_t)in->k);
    moe__distill_put64(h + 16, (uint64_t)in->vocab);
    moe__distill_put64(h + 24, (uint64_t)in->count);
    memcpy(&tb, &in->temperature, 4);
    moe__distill_put32(h + 32, tb);
    moe__distill_put64(h + 40, in->tag);
}

struct moe_distill_writer {
    FILE *f;
    char path[4096], tmp[4200];
    moe_distill_info info;
    uint64_t hash;       /* FNV-1a of the records written so far */
    unsigned char *rec;  /* one encoded record */
    unsigned char *mark; /* V bytes: the current row's top-k ids */
    double *lp;          /* V log-probabilities of the current row */
    int64_t *top;        /* k ids of the current row, most likely first */
    int failed, done;
};

MOE_API moe_status moe_distill_writer_new(moe_ctx *ctx, const char *path, int64_t vocab, int64_t k, float temperature,
                                          uint64_t tag, moe_distill_writer **out) {
    static const char *fn = "moe_distill_writer_new";
    moe_distill_writer *w;
    unsigned char hdr[MOE__DISTILL_HDR];
    MOE__CHECK_CTX(ctx);
    if (!out) return moe__fail(ctx, MOE_ERR_ARG, "%s: out is NULL", fn);
    *out = NULL;
    if (!path || !*path || strlen(path) >= 4096) return moe__fail(ctx, MOE_ERR_ARG, "%s: bad path", fn);
    if (vocab < 1 || vocab > 0x7FFFFFFF) return moe__fail(ctx, MOE_ERR_ARG, "%s: vocab must be in [1, 2^31), got %lld", fn, (long long)vocab);
    if (k < 1 || k > vocab || k > 0x0FFFFFFF)
        return moe__fail(ctx, MOE_ERR_ARG, "%s: k must be in [1, vocab = %lld], got %lld", fn, (long long)vocab, (long long)k);
    if (!(temperature > 0.0f) || !isfinite(temperature))
        return moe__fail(ctx, MOE_ERR_ARG, "%s: temperature must be a finite number > 0, got %g", fn, (double)temperature);
    w = (moe_distill_writer *)moe__heap_calloc(ctx, sizeof *w);
    if (!w) return moe__fail(ctx, MOE_ERR_MEMORY, "%s: out of memory", fn);
    w->info.vocab = vocab;
    w->info.k = k;
    w->info.temperature = temperature;
    w->info.tag = tag;
    w->hash = 0xCBF29CE484222325ull;
    snprintf(w->path, sizeof w->path, "%s", path);
    snprintf(w->tmp, sizeof w->tmp, "%s.tmp%ld", path, (long)getpid());
    w->rec = (unsigned char *)moe__heap_alloc(ctx, (size_t)(8 * k + 4));
    w->mark = (unsigned char *)moe__heap_calloc(ctx, (size_t)vocab);
    w->lp = (double *)moe__heap_alloc(ctx, sizeof(double) * (size_t)vocab);
    w->top = (int64_t *)moe__heap_alloc(ctx, sizeof(int64_t) * (size_t)k);
    if (!w->rec || !w->mark || !w->lp || !w->top) {
        moe_distill_writer_free(w);
        return moe__fail(ctx, MOE_ERR_MEMORY, "%s: out of memory for vocab %lld, k %lld", fn, (long long)vocab, (long long)k);
    }
    w->f = fopen(w->tmp, "wb");
    if (!w->f) {
        moe_status s = moe__fail(ctx, MOE_ERR_IO, "%s: cannot create '%s': %s", fn, w->tmp, strerror(errno));
        moe_distill_writer_free(w);
        return s;
    }
    moe__distill_header(hdr, &w->info); /* a placeholder: count and checksum come at the end */
    if (fwrite(hdr, 1, sizeof hdr, w->f) != sizeof hdr) {
        moe_status s = moe__fail(ctx, MOE_ERR_IO, "%s: writing '%s' failed: %s", fn, w->tmp, strerror(errno));
        moe_distill_writer_free(w);
        return s;
    }
    *out = w;
    return MOE_OK;
}

MOE_API moe_status moe_distill_writer_add(moe_ctx *ctx, moe_distill_writer *w, const moe_tensor *teacher_logits) {
    static const char *fn = "moe_distill_writer_add";
    int64_t V, k, rows, r, j, i;
    double invT;
    MOE__CHECK_CTX(ctx);
    if (!w) return moe__fail(ctx, MOE_ERR_ARG, "%s: writer is NULL", fn);
    if (w->done || w->failed) return moe__fail(ctx, MOE_ERR_STATE, "%s: the writer is %s", fn, w->done ? "finished" : "failed");
    MOE__TRY(moe__check_f32(ctx, fn, teacher_logits, "teacher_logits"));
    V = w->info.vocab;
    k = w->info.k;
    if (MOE__LAST(teacher_logits) != V)
        return moe__fail(ctx, MOE_ERR_SHAPE, "%s: the logits' vocabulary is %lld, the cache's %lld", fn,
                         (long long)MOE__LAST(teacher_logits), (long long)V);
    rows = teacher_logits->numel / V;
    invT = 1.0 / (double)w->info.temperature;
    for (r = 0; r < rows; r++) {
        const moe_real *z = MOE__F32(teacher_logits) + r * V;
        double mx = -INFINITY, sum = 0, lse, tail = 0;
        int64_t n = 0;
        for (j = 0; j < V; j++) {
            if (!isfinite((double)z[j]))
                return moe__fail(ctx, MOE_ERR_NUMERIC, "%s: teacher logit %lld of row %lld is %g", fn, (long long)j, (long long)r, (double)z[j]);
            if ((double)z[j] > mx) mx = (double)z[j];
        }
        for (j = 0; j < V; j++) sum += exp(((double)z[j] - mx) * invT);
        lse = log(sum);
        /* top-k by insertion into a descending list; an equal value stays behind the lower id */
        for (j = 0; j < V; j++) {
            double v = w->lp[j] = ((double)z[j] - mx) * invT - lse;
            int64_t pos;
            if (n == k && v <= w->lp[w->top[k - 1]]) continue;
            pos = n < k ? n++ : k - 1;
            while (pos > 0 && v > w->lp[w->top[pos - 1]]) {
                w->top[pos] = w->top[pos - 1];
                pos--;
            }
            w->top[pos] = j;
        }
        for (i = 0; i < k; i++) w->mark[w->top[i]] = 1;
        for (j = 0; j < V; j++)
            if (!w->mark[j]) tail += exp(w->lp[j]);
        for (i = 0; i < k; i++) {
            float f = (float)w->lp[w->top[i]];
            uint32_t u;
            w->mark[w->top[i]] = 0;
            memcpy(&u, &f, 4);
            moe__distill_put32(w->rec + 4 * i, (uint32_t)w->top[i]);
            moe__distill_put32(w->rec + 4 * (k + i), u);
        }
        {
            float f = (float)tail;
            uint32_t u;
            memcpy(&u, &f, 4);
            moe__distill_put32(w->rec + 8 * k, u);
        }
        w->hash = moe__distill_fnv(w->hash, w->rec, (size_t)(8 * k + 4));
        if (fwrite(w->rec, 1, (size_t)(8 * k + 4), w->f) != (size_t)(8 * k + 4)) {
            w->failed = 1;
            return moe__fail(ctx, MOE_ERR_IO, "%s: writing '%s' failed: %s", fn, w->tmp, strerror(errno));
        }
        w->info.count++;
    }
    return MOE_OK;
}

MOE_API moe_status moe_distill_writer_finish(moe_ctx *ctx, moe_distill_writer *w) {
    static const char *fn = "moe_distill_writer_finish";
    unsigned char hdr[MOE__DISTILL_HDR];
    uint64_t h;
    int ok;
    MOE__CHECK_CTX(ctx);
    if (!w) return moe__fail(ctx, MOE_ERR_ARG, "%s: writer is NULL", fn);
    if (w->done || w->failed) return moe__fail(ctx, MOE_ERR_STATE, "%s: the writer is %s", fn, w->done ? "finished" : "failed");
    moe__distill_header(hdr, &w->info);
    h = moe__distill_fnv(w->hash, hdr, 56);
    moe__distill_put64(hdr + 56, h);
    ok = fflush(w->f) == 0 && fseek(w->f, 0, SEEK_SET) == 0 && fwrite(hdr, 1, sizeof hdr, w->f) == sizeof hdr && fflush(w->f) == 0;
#if defined(_POSIX_C_SOURCE) && _POSIX_C_SOURCE >= 200112L
    ok = ok && fsync(fileno(w->f)) == 0;
#endif
    ok = (fclose(w->f) == 0) && ok;
    w->f = NULL;
    if (!ok || rename(w->tmp, w->path) != 0) {
        int e = errno;
        w->failed = 1;
        remove(w->tmp);
        return moe__fail(ctx, MOE_ERR_IO, "%s: writing '%s' failed: %s", fn, w->path, strerror(e));
    }
    w->done = 1;
    return MOE_OK;
}

MOE_API void moe_distill_writer_free(moe_distill_writer *w) {
    if (!w) return;
    if (w->f) fclose(w->f);
    if (!w->done && w->tmp[0]) remove(w->tmp);
    MOE_FREE(w->rec);
    MOE_FREE(w->mark);
    MOE_FREE(w->lp);
    MOE_FREE(w->top);
    MOE_FREE(w);
}

struct moe_distill_cache {
    FILE *f;
    moe_distill_info info;
    size_t rec_bytes;
    unsigned char *mark; /* V bytes for the per-record checks */
    char path[1024];     /* for messages (may be cut) */
};

MOE_API void moe_distill_cache_close(moe_distill_cache *c) {
    if (!c) return;
    if (c->f) fclose(c->f);
    MOE_FREE(c->mark);
    MOE_FREE(c);
}

MOE_API moe_distill_info moe_distill_cache_info(const moe_distill_cache *c) {
    moe_distill_info i;
    memset(&i, 0, sizeof i);
    return c ? c->info : i;
}

MOE_API moe_status moe_distill_cache_open(moe_ctx *ctx, const char *path, moe_distill_cache **out) {
    static const char *fn = "moe_distill_cache_open";
    unsigned char hdr[MOE__DISTILL_HDR], *buf = NULL;
    moe_distill_cache *c;
    uint64_t vocab, k, count, want, h = 0xCBF29CE484222325ull, left;
    uint32_t tb;
    long size = 0;
    moe_status s = MOE_OK;
    MOE__CHECK_CTX(ctx);
    if (!out) return moe__fail(ctx, MOE_ERR_ARG, "%s: out is NULL", fn);
    *out = NULL;
    if (!path) return moe__fail(ctx, MOE_ERR_ARG, "%s: path is NULL", fn);
    c = (moe_distill_cache *)moe__heap_calloc(ctx, sizeof *c);
    if (!c) return moe__fail(ctx, MOE_ERR_MEMORY, "%s: out of memory", fn);
    snprintf(c->path, sizeof c->path, "%s", path);
    c->f = fopen(path, "rb");
    if (!c->f) s = moe__fail(ctx, MOE_ERR_IO, "%s: cannot open '%s': %s", fn, path, strerror(errno));
    else if (fseek(c->f, 0, SEEK_END) != 0 || (size = ftell(c->f)) < 0 || fseek(c->f, 0, SEEK_SET) != 0)
        s = moe__fail(ctx, MOE_ERR_IO, "%s: cannot size '%s'", fn, path);
    else if (size < MOE__DISTILL_HDR || fread(hdr, 1, sizeof hdr, c->f) != sizeof hdr)
        s = moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s' is truncated: %ld bytes, shorter than the %d-byte header", fn, path, size,
                      MOE__DISTILL_HDR);
    else if (memcmp(hdr, MOE__DISTILL_MAGIC, 8) != 0)
        s = moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s' is not a moe.h distillation cache (bad magic)", fn, path);
    else if (moe__distill_get32(hdr + 8) != MOE__DISTILL_VERSION)
        s = moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s' has version %u, this build reads version %u", fn, path,
                      (unsigned)moe__distill_get32(hdr + 8), MOE__DISTILL_VERSION);
    if (s != MOE_OK) {
        moe_distill_cache_close(c);
        return s;
    }
    k = moe__distill_get32(hdr + 12);
    vocab = moe__distill_get64(hdr + 16);
    count = moe__distill_get64(hdr + 24);
    tb = moe__distill_get32(hdr + 32);
    memcpy(&c->info.temperature, &tb, 4);
    if (vocab < 1 || vocab > 0x7FFFFFFF || k < 1 || k > vocab || k > 0x0FFFFFFF)
        s = moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s' has a bad header: vocab %llu, k %llu", fn, path, (unsigned long long)vocab,
                      (unsigned long long)k);
    else if (!(c->info.temperature > 0.0f) || !isfinite(c->info.temperature))
        s = moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s' has a bad header: temperature %g", fn, path, (double)c->info.temperature);
    else if (moe__distill_get32(hdr + 36) != 0 || moe__distill_get64(hdr + 48) != 0)
        s = moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s' has a bad header: reserved fields are not zero", fn, path);
    else {
        c->rec_bytes = (size_t)(8 * k + 4);
        /* size = 64 + count·rec, checked without overflow */
        if (count > ((uint64_t)size - MOE__DISTILL_HDR) / c->rec_bytes ||
            (want = MOE__DISTILL_HDR + count * c->rec_bytes) != (uint64_t)size) {
            s = moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s' is truncated or padded: the header says %llu records of %zu bytes, "
                          "the file has %ld bytes", fn, path, (unsigned long long)count, c->rec_bytes, size);
        }
    }
    if (s == MOE_OK) {
        const size_t chunk = (size_t)1 << 20;
        buf = (unsigned char *)moe__heap_alloc(ctx, chunk);
        if (!buf) s = moe__fail(ctx, MOE_ERR_MEMORY, "%s: out of memory", fn);
        for (left = (uint64_t)size - MOE__DISTILL_HDR; s == MOE_OK && left > 0;) {
            size_t n = left < chunk ? (size_t)left : chunk;
            if (fread(buf, 1, n, c->f) != n) s = moe__fail(ctx, MOE_ERR_IO, "%s: short read on '%s'", fn, path);
            h = moe__distill_fnv(h, buf, n);
            left -= n;
        }
        MOE_FREE(buf);
        if (s == MOE_OK && moe__distill_fnv(h, hdr, 56) != moe__distill_get64(hdr + 56))
            s = moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s' fails its checksum (corrupted)", fn, path);
    }
    if (s == MOE_OK) {
        c->mark = (unsigned char *)moe__heap_calloc(ctx, (size_t)vocab);
        if (!c->mark) s = moe__fail(ctx, MOE_ERR_MEMORY, "%s: out of memory", fn);
    }
    if (s != MOE_OK) {
        moe_distill_cache_close(c);
        return s;
    }
    c->info.vocab = (int64_t)vocab;
    c->info.k = (int64_t)k;
    c->info.count = (int64_t)count;
    c->info.tag = moe__distill_get64(hdr + 40);
    *out = c;
    return MOE_OK;
}

MOE_API moe_status moe_distill_cache_read(moe_ctx *ctx, moe_distill_cache *c, int64_t first, int64_t rows,
                                          moe_tensor **ids, moe_tensor **logp, moe_tensor **tail) {
    static const char *fn = "moe_distill_cache_read";
    int64_t shape[2], k, r, i;
    unsigned char *raw;
    size_t bytes;
    uint64_t off;
    MOE__CHECK_CTX(ctx);
    if (!c || !ids || !logp || !tail) return moe__fail(ctx, MOE_ERR_ARG, "%s: NULL cache or output", fn);
    *ids = *logp = *tail = NULL;
    if (first < 0 || rows < 1 || first > c->info.count - rows)
        return moe__fail(ctx, MOE_ERR_ARG, "%s: records [%lld, %lld + %lld) are outside the %lld in '%s'", fn, (long long)first,
                         (long long)first, (long long)rows, (long long)c->info.count, c->path);
    k = c->info.k;
    if (moe__mul_overflows((size_t)rows, c->rec_bytes, &bytes)) return moe__fail(ctx, MOE_ERR_MEMORY, "%s: size overflows", fn);
    off = MOE__DISTILL_HDR + (uint64_t)first * c->rec_bytes; /* below the file size: checked at open */
    if ((uint64_t)(long)off != off || (long)off < 0)
        return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "%s: offset %llu does not fit fseek", fn, (unsigned long long)off);
    raw = (unsigned char *)moe__arena_alloc_raw(ctx, bytes);
    if (!raw) return moe__fail(ctx, MOE_ERR_MEMORY, "%s: no memory for %zu bytes", fn, bytes);
    if (fseek(c->f, (long)off, SEEK_SET) != 0 || fread(raw, 1, bytes, c->f) != bytes)
        return moe__fail(ctx, MOE_ERR_IO, "%s: reading records %lld.. of '%s' failed (file changed since it was opened?)", fn,
                         (long long)first, c->path);
    shape[0] = rows;
    shape[1] = k;
    MOE__TRY(moe_tensor_temp(ctx, MOE_I32, 2, shape, ids));
    MOE__TRY(moe_tensor_temp(ctx, MOE_F32, 2, shape, logp));
    MOE__TRY(moe_tensor_temp(ctx, MOE_F32, 1, shape, tail));
    for (r = 0; r < rows; r++) {
        const unsigned char *p = raw + (size_t)r * c->rec_bytes;
        float f;
        uint32_t u;
        for (i = 0; i < k; i++) {
            MOE__I32(*ids)[r * k + i] = (int32_t)moe__distill_get32(p + 4 * i);
            u = moe__distill_get32(p + 4 * (k + i));
            memcpy(&f, &u, 4);
            MOE__F32(*logp)[r * k + i] = (moe_real)f;
        }
        u = moe__distill_get32(p + 8 * k);
        memcpy(&f, &u, 4);
        MOE__F32(*tail)[r] = (moe_real)f;
    }
    /* the checksum catches damage, not a hostile writer: check what the loss relies on */
    return moe__distill_check_topk(ctx, fn, MOE_ERR_FORMAT, first, MOE__I32(*ids), MOE__F32(*logp), MOE__F32(*tail), rows, k,
                                   c->info.vocab, c->mark);
}

MOE_API moe_status moe_model_distill_loss_cached(moe_ctx *ctx, moe_model *student, moe_distill_cache *cache,
                                                 int64_t first, const int32_t *tokens, int64_t batch, int64_t seq,
                                                 const moe_loss_opts *lopts, const moe_distill_opts *dopts,
                                                 moe_tensor **loss, moe_distill_parts *parts) {
    static const char *fn = "moe_model_distill_loss_cached";
    moe_tensor *ids, *logp, *tail;
    moe_distill_opts o;
    MOE__TRY(moe__check_out(ctx, fn, loss));
    MOE__TRY(moe__check_tokens(ctx, fn, student, tokens, batch, seq, batch * (seq + 1)));
    if (!cache) return moe__fail(ctx, MOE_ERR_ARG, "%s: cache is NULL", fn);
    MOE__TRY(moe__distill_opts(ctx, fn, dopts, &o));
    if (cache->info.vocab != student->cfg.vocab_size)
        return moe__fail(ctx, MOE_ERR_CONFIG, "%s: the cache '%s' has vocabulary %lld, the student %lld: distillation needs the "
                         "same vocabulary", fn, cache->path, (long long)cache->info.vocab, (long long)student->cfg.vocab_size);
    if (cache->info.temperature != o.temperature)
        return moe__fail(ctx, MOE_ERR_CONFIG, "%s: the cache '%s' holds the teacher at temperature %g, the loss asks for %g "
                         "(top-k log-probabilities cannot be re-tempered: write the cache at the temperature you train with)",
                         fn, cache->path, (double)cache->info.temperature, (double)o.temperature);
    MOE__TRY(moe_distill_cache_read(ctx, cache, first, batch * seq, &ids, &logp, &tail));
    return moe__model_distill_student(ctx, fn, student, tokens, batch, seq, lopts, &o, NULL, ids, logp, tail, loss, parts);
}
